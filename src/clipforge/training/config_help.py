"""`clipforge train --help`: every TrainConfig field with its default and comment, read from the dataclass.

Generated rather than written so the help can never fall behind the config: a new field with a
comment appears in --help by itself (tests check that every field is listed).
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from dataclasses import fields

from clipforge.training.config import TrainConfig, _kind

_FIELD_LINE = re.compile(r"^    (\w+): [^=]+=.*?(?:  # (.*))?$")
_COMMENT_LINE = re.compile(r"^    # ?(.*)$")
_TYPE_WORDS = {bool: "true|false", int: "INT", float: "NUMBER", str: "TEXT", list: "LIST", dict: "TABLE"}


def field_comments() -> dict[str, str]:
    """name -> the comment on its line in TrainConfig (or the comment lines just above it)."""
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # no source shipped: the help still lists names and defaults
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        if match := _COMMENT_LINE.match(line):
            above.append(match.group(1).strip())
        elif match := _FIELD_LINE.match(line):
            comments[match.group(1)] = " ".join(above + [match.group(2) or ""]).strip()
            above = []
        else:
            above = []
    return comments


def _default_text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def training_options_help(width: int = 100) -> str:
    """The epilog of `clipforge train --help`: one entry per field, as the command line writes it."""
    comments = field_comments()
    defaults = TrainConfig()
    lines = ["training options: --name value on the command line (a bare --name means true; data keys as",
             "--data.path train.tsv); in a --config file the same names with _ for -, as name = value:"]
    for spec in fields(TrainConfig):
        name = spec.name
        default = _default_text(getattr(defaults, name))
        lines.append(f"  --{name.replace('_', '-')} {_TYPE_WORDS[_kind(name)]} (default {default})")
        if comments.get(name):
            lines += textwrap.wrap(comments[name], width=width, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "exit status: 0 finished (or already finished: nothing to do), 2 a bad input (one line says which",
              "and how to fix it), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (rerun the same",
              "command to resume)."]
    return "\n".join(lines)
