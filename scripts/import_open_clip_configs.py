"""Developer tool: write clipforge's copies of open_clip's plain-CLIP model configs.

Run with an environment that has open_clip_torch (the test dependencies):
    .venv/bin/python scripts/import_open_clip_configs.py
Each open_clip model config whose towers clipforge implements (ViT or ModifiedResNet image
tower, transformer text tower) is converted field by field and written as clipforge JSON into
src/clipforge/models/configs/ under open_clip's name; the others are listed as skipped.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from clipforge.models.open_clip_config import model_config_from_open_clip
from clipforge.errors import ClipforgeError

TARGET = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "models" / "configs"


def main() -> int:
    folder = resources.files("open_clip") / "model_configs"
    written, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        name = entry.name[:-5]
        data = json.loads(entry.read_text(encoding="utf-8"))
        if data.get("custom_text") or "multimodal_cfg" in data or "init_logit_bias" in data:
            skipped.append(name)
            continue
        try:
            config = model_config_from_open_clip(data, name)
        except ClipforgeError as error:
            skipped.append(f"{name} ({error})")
            continue
        (TARGET / entry.name).write_text(json.dumps(config.to_dict(), indent=1) + "\n", encoding="utf-8")
        written.append(name)
    print(f"wrote {len(written)} configs to {TARGET}")
    print(f"skipped {len(skipped)}: " + ", ".join(s.split(' (')[0] for s in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
