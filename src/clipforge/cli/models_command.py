"""``clipforge models``: the built-in architectures, or (--pretrained) open_clip's pretrained tags."""

from __future__ import annotations

import argparse


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the built-in architectures (--pretrained: the pretrained weights)")
    parser.add_argument("--pretrained", nargs="?", const="", default=None, metavar="ARCH",
                        help="list open_clip's pretrained (architecture, tag) pairs instead, optionally of one ARCH")
    parser.set_defaults(run=run_models_command)


def run_models_command(args: argparse.Namespace) -> int:
    if getattr(args, "pretrained", None) is not None:
        return _pretrained_table(args.pretrained or None)
    return _architectures_table()


def _architectures_table() -> int:
    import torch

    from clipforge.checkpoints import RELEASED
    from clipforge.cli.main import _print_table
    from clipforge.models import available_models, create_model

    rows = []
    for name in available_models():
        with torch.device("meta"):
            model = create_model(name)
        v = model.config.vision
        tower = f"ViT {v.width}w x{v.layers} /{v.patch_size}" if v.type == "vit" else f"ResNet {v.width}w {list(v.layers)}"
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, tower, str(v.image_size), f"{params / 1e6:.2f}M", "yes" if name in RELEASED else "-"))
    _print_table(("model", "image tower", "res", "params", "OpenAI weights"), rows)
    return 0


def _pretrained_table(architecture: str | None) -> int:
    """Rows straight from the registry; an unknown ARCH gets get_pretrained's sentence (close names)."""
    from clipforge.checkpoints.pretrained import get_pretrained, list_pretrained
    from clipforge.cli.main import _print_table

    names = list_pretrained(architecture)
    if not names:
        get_pretrained(architecture or "", "")  # raises UnknownModelError naming close architectures
    rows = [(n.architecture, n.tag, n.source, "yes" if get_pretrained(n.architecture, n.tag).quick_gelu else "no")
            for n in names]
    _print_table(("architecture", "tag", "source", "quick_gelu"), rows)
    architectures = len({row[0] for row in rows})
    print(f"\n{len(rows)} pretrained weights for {architectures} architecture{'s' * (architectures != 1)} "
          "(open_clip's registry)")
    return 0
