"""Errors that clipforge raises on purpose.

Every error a user can cause (bad path, bad config, unknown model, corrupt file) is a
``ClipforgeError`` whose message is one sentence saying what went wrong and what to do.
The CLI prints that sentence alone; ``--debug`` shows the traceback.
"""


def shorten(value: object, limit: int = 120) -> str:
    """``value`` as text on one line, at most ``limit`` characters, so a sentence quoting a user's
    input (a path, a caption, a config value) stays one short line."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ClipforgeError(Exception):
    """Base class: a problem with the user's input, not a bug in clipforge."""


class ConfigError(ClipforgeError, ValueError):
    """A model or training configuration is invalid; the message names the field."""


class UnknownModelError(ClipforgeError, KeyError):
    """A model name is neither a built-in architecture nor an existing file."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(ClipforgeError):
    """A checkpoint is missing, truncated, of an unknown format, or does not fit the model."""


class DownloadError(ClipforgeError):
    """A download failed, or the downloaded file does not match its expected checksum."""


class ImageError(ClipforgeError):
    """An image file cannot be opened or decoded."""


class TokenizerError(ClipforgeError, RuntimeError):
    """A text cannot be tokenized as asked (for example it is too long and truncation is off)."""


class InputError(ClipforgeError, ValueError):
    """A tensor or text given to a model does not fit it (wrong image size, text too long, missing tower)."""
