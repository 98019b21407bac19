"""The ``clipforge`` command: models, classify, convert, train, eval, make-shards.

Errors a user can cause print one sentence and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import NoReturn, Sequence

from clipforge.errors import ClipforgeError


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (--top, --batch-size, --threads)."""
    return _int_at_least(text, 1, "a positive whole number")


def non_negative_int(text: str) -> int:
    """argparse type for counts that may be 0 (--workers)."""
    return _int_at_least(text, 0, "a whole number, 0 or more")


def _int_at_least(text: str, low: int, what: str) -> int:
    shown = text if len(text) <= 40 else text[:37] + "..."
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {shown!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def threads_value(text: str) -> int | str:
    """argparse type for --threads: a positive whole number or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    return _int_at_least(text, 1, "a positive whole number or 'auto'")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=threads_value, default=None,
                        help="CPU threads: N, or auto (the cores other jobs leave free); default one per physical core "
                             "this process may use (affinity, container quota), shared among local ranks")


def apply_threads(args: argparse.Namespace, torch_too: bool = True) -> None:
    """--threads (or clipforge.threads' default) for torch and for onnxruntime, so threads never outnumber cores;
    ``torch_too=False`` on the ONNX path, which must not import torch."""
    from clipforge.runtime.onnx_model import set_default_threads
    from clipforge.threads import choose_threads

    count = choose_threads(getattr(args, "threads", None))
    set_default_threads(count)
    if torch_too:
        import torch

        if torch.get_num_threads() != count:
            torch.set_num_threads(count)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``clipforge: error: ...``) and exit status 2, like every other
    user error; the full usage stays one ``--help`` away."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        if len(text) > 300:
            text = text[:297] + "..."
        self.exit(2, f"clipforge: error: {text}; see {self.prog} --help\n")


def _overrides(extra: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--data.path', 'x.csv', '--grad-checkpointing'] -> {'lr': '1e-3', ...}."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or token == "--":
            raise ClipforgeError(f"unexpected argument '{token[:60]}'; training options are written --name value "
                                 "(clipforge train --help lists them)")
        key, equals, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not key:
            raise ClipforgeError(f"argument '{token[:60]}' has no option name; write --name value")
        if not equals:
            if index + 1 < len(extra) and not extra[index + 1].startswith("--"):
                value, index = extra[index + 1], index + 1
            else:
                value = "true"  # a bare flag such as --grad-checkpointing
        overrides[key] = value
        index += 1
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    """Exit status: 0 finished (or already finished), 130 / 143 stopped by SIGINT / SIGTERM after a checkpoint."""
    from clipforge.training import load_train_config, train

    config = load_train_config(args.config, _overrides(args.overrides))
    return int(train(config).get("exit_status") or 0)


MAX_IMAGE_SIZE = 1024  # beyond this, resized position tables and attention exhaust memory before any output


def _quick_gelu(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]


def build_parser() -> argparse.ArgumentParser:
    from clipforge import __version__

    parser = _OneLineParser(prog="clipforge", description="CLIP models: classify, convert, list.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from clipforge.cli.models_command import add_models_parser

    add_models_parser(sub)

    gelu_help = ("activation for plain state dicts, which do not record it (and an override elsewhere): "
                 "auto (from the checkpoint or --model-config), yes (QuickGELU), no (GELU)")
    from clipforge.cli.classify_command import add_classify_parser
    from clipforge.cli.convert_command import add_convert_parser

    add_classify_parser(sub, gelu_help)
    add_convert_parser(sub, gelu_help)

    from clipforge.cli.export_command import add_export_parser

    add_export_parser(sub, gelu_help)

    from clipforge.training.config_help import training_options_help

    train = sub.add_parser("train", help="contrastive pre-training or fine-tuning (torchrun for many processes)",
                           description="Options come from --config (TOML or JSON) and are overridden by --name value "
                                       "pairs, e.g. --lr 1e-3 --data.path train.csv --grad-checkpointing. Rerunning "
                                       "the same command resumes; Ctrl-C or SIGTERM saves a checkpoint first.",
                           epilog=training_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="TOML or JSON training config")
    train.set_defaults(run=_cmd_train)

    from clipforge.cli.eval_command import add_eval_parser

    add_eval_parser(sub, gelu_help)
    from clipforge.cli.benchmark_command import add_benchmark_parser

    add_benchmark_parser(sub, gelu_help)

    from clipforge.cli.embed_command import add_embed_parser

    add_embed_parser(sub, gelu_help)

    from clipforge.cli.serve_command import add_serve_parser

    add_serve_parser(sub)

    from clipforge.cli.index_command import add_index_parser
    from clipforge.cli.search_command import add_search_parsers

    add_index_parser(sub, gelu_help)
    add_search_parsers(sub)

    sub.add_parser("make-shards", help="turn a CSV/TSV dataset into WebDataset tar shards "
                                       "(clipforge make-shards --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-shards"]:  # its own parser, shared with python -m clipforge.data.make_shards
        from clipforge.data.make_shards import main as make_shards_main

        return _guarded(lambda: make_shards_main(argv[1:]), debug="--debug" in argv)
    try:  # usage errors, --help and --version end in SystemExit; callers of main() get its status instead
        args, extra = build_parser().parse_known_args(argv)
        if args.command == "train":
            args.overrides = extra
        elif extra:
            build_parser().parse_args(argv)  # let argparse report the unknown arguments
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    if hasattr(args, "quick_gelu"):
        args.quick_gelu = _quick_gelu(args.quick_gelu)
    return _guarded(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    """Check the options several commands share (convert_command.add_architecture_options), then run."""
    size = getattr(args, "image_size", None)
    if size is not None and not 1 <= size <= MAX_IMAGE_SIZE:
        raise ClipforgeError(f"--image-size must be 1 to {MAX_IMAGE_SIZE} pixels (CLIP models run at 224 to 448), "
                             f"got {size}")
    if getattr(args, "model", None) == "" or getattr(args, "source", None) == "":
        raise ClipforgeError("the model is an empty string; pass a checkpoint path, a released name such as "
                             "ViT-B-32, ARCH/TAG or hf-hub:ORG/REPO")
    return args.run(args)


# OS errors about a path the user named (too long, no permission, disk full...): their input, not a bug.
_USER_ERRNOS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.ELOOP, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _one_line(message: str, longest: int = 120) -> str:
    """The message on one line, each over-long word (a quoted path or value) cut, so it stays readable."""
    def cut(word: str) -> str:
        if len(word) <= longest:
            return word
        tail = word[len(word.rstrip("'\",;:.)")):][-3:]  # keep a closing quote and punctuation
        return word[:longest - 3 - len(tail)] + "..." + tail

    return " ".join(cut(word) for word in str(message).split())


def _guarded(run, debug: bool) -> int:
    """User errors: one sentence on stderr, exit status 2 (the traceback only with --debug)."""
    try:
        return run()
    except ClipforgeError as error:
        if debug:
            raise
        print(f"clipforge: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        if debug or error.errno not in _USER_ERRNOS or error.filename is None:
            raise
        print(f"clipforge: error: {_one_line(f'{error.strerror}: {error.filename!r}')}; check the path "
              "(--debug shows where it was used)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
