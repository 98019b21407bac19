"""Write src/clipforge/checkpoints/pretrained_tags.json from open_clip's pretrained registry.

A developer tool: clipforge never imports open_clip at runtime, so the names, Hub repos, URLs
and preprocessing numbers of open_clip's plain-CLIP weights are copied here once, as data.
Run it after upgrading open_clip and commit the JSON:

    .venv/bin/python scripts/import_open_clip_pretrained.py [--check]

--check exits with status 1 when the committed JSON differs from what would be written.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "src" / "clipforge" / "checkpoints" / "pretrained_tags.json"

# open_clip model configs that are plain CLIP (OpenAI layout: ResNet or ViT image tower, the
# standard text transformer); CoCa, SigLIP, EVA, ConvNeXt, MobileCLIP, ... are left out.
PLAIN_CLIP = (
    "RN50 RN50-quickgelu RN101 RN101-quickgelu RN50x4 RN50x4-quickgelu RN50x16 RN50x16-quickgelu "
    "RN50x64 RN50x64-quickgelu ViT-B-32 ViT-B-32-quickgelu ViT-B-32-256 ViT-B-32-plus-256 ViT-B-16 "
    "ViT-B-16-quickgelu ViT-B-16-plus ViT-B-16-plus-240 ViT-L-14 ViT-L-14-quickgelu ViT-L-14-280 "
    "ViT-L-14-336 ViT-L-14-336-quickgelu ViT-L-16 ViT-L-16-320 ViT-H-14 ViT-H-14-quickgelu ViT-H-14-378 "
    "ViT-H-14-378-quickgelu ViT-H-16 ViT-g-14 ViT-bigG-14 ViT-bigG-14-quickgelu ViT-e-14 ViT-S-16 "
    "ViT-S-16-alt ViT-S-32 ViT-S-32-alt ViT-M-16 ViT-M-16-alt ViT-M-32 ViT-M-32-alt ViT-L-14-CLIPA "
    "ViT-L-14-CLIPA-336 ViT-H-14-CLIPA ViT-H-14-CLIPA-336 ViT-bigG-14-CLIPA ViT-bigG-14-CLIPA-336 "
    "ViT-H-14-worldwide ViT-H-14-worldwide-quickgelu ViT-H-14-worldwide-378 ViT-L-14-worldwide "
    "ViT-L-14-worldwide-quickgelu ViT-bigG-14-worldwide ViT-bigG-14-worldwide-378"
).split()

# open_clip cfg keys this script knows how to copy; any other key stops it (a new fact to model).
_KNOWN_KEYS = {"url", "hf_hub", "quick_gelu", "mean", "std", "interpolation", "resize_mode", "fill_color", "size"}
_QUICKGELU = "-quickgelu"


def _plain(value):
    """Tuples -> lists, so the JSON holds only lists, numbers and strings."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def build_records() -> list[dict]:
    from open_clip import pretrained as oc

    from clipforge.checkpoints.download import RELEASED

    records = []
    for architecture in PLAIN_CLIP:
        for tag, cfg in oc._PRETRAINED.get(architecture, {}).items():
            unknown = set(cfg) - _KNOWN_KEYS
            if unknown:
                sys.exit(f"{architecture}/{tag} has open_clip keys {sorted(unknown)} this script does not copy; "
                         "extend _KNOWN_KEYS and clipforge.checkpoints.pretrained.PretrainedWeights")
            record = {"architecture": architecture, "tag": tag, "quick_gelu": bool(cfg.get("quick_gelu", False))}
            url = cfg.get("url") or ""
            base = architecture.removesuffix(_QUICKGELU)
            if tag == "openai" and base in RELEASED:
                if url and url != RELEASED[base]:
                    print(f"warning: {architecture}/openai: open_clip's URL {url} differs from RELEASED "
                          f"{RELEASED[base]}; keeping RELEASED", file=sys.stderr)
                url = RELEASED[base]
            if url:
                record["url"] = url
            if cfg.get("hf_hub"):
                # open_clip writes 'org/repo/' (default weights file) or 'org/repo/filename'
                repo_id, filename = posixpath.split(cfg["hf_hub"])  # as open_clip's download_pretrained
                record["hf_hub_id"] = repo_id
                if filename:
                    record["hf_filename"] = filename
            for key in ("mean", "std", "interpolation", "resize_mode", "fill_color", "size"):
                if key in cfg:
                    record[key] = _plain(cfg[key])
            records.append(record)
    return sorted(records, key=lambda r: (r["architecture"], r["tag"]))


def render(records: list[dict]) -> str:
    import open_clip

    data = {
        "about": "open_clip's pretrained registry for plain-CLIP architectures; written by "
                 "scripts/import_open_clip_pretrained.py, do not edit by hand",
        "open_clip_version": open_clip.__version__,
        "pretrained": records,
    }
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args(argv)
    records = build_records()
    text = render(records)
    architectures = len({r["architecture"] for r in records})
    if args.check:
        same = OUTPUT.is_file() and OUTPUT.read_text(encoding="utf-8") == text
        print(f"{OUTPUT.relative_to(ROOT)} is {'up to date' if same else 'out of date; run this script'}")
        return 0 if same else 1
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(records)} records for {architectures} architectures to {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
