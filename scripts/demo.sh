#!/usr/bin/env bash
# The main job until training lands: make a checkpoint in each public format, convert between
# them, and zero-shot classify real images from ../shared/data with every copy. The model is
# randomly initialised (no weights can be downloaded here), so the rankings are not meaningful;
# what the demo shows is that every format loads, converts and classifies identically.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
CLI=.venv/bin/clipforge
.venv/bin/clipforge models
.venv/bin/python - "$OUT" <<'PY'
import sys, torch, clipforge
torch.manual_seed(0)
model = clipforge.create_model("ViT-Tiny-32")
print("wrote", clipforge.save(model, f"{sys.argv[1]}/tiny.safetensors"))
PY
$CLI convert "$OUT/tiny.safetensors" "$OUT/tiny-hf" --to hf
$CLI convert "$OUT/tiny-hf" "$OUT/tiny-open_clip" --to open_clip
IMAGES=$(ls ../shared/data/cifar10/test/cat/000[0-2].jpg 2>/dev/null || true)
if [ -z "$IMAGES" ]; then
    echo "../shared/data is absent: skipping the classification part of the demo"; exit 0
fi
for source in "$OUT/tiny.safetensors" "$OUT/tiny-hf" "$OUT/tiny-open_clip"; do
    echo "== $source"
    $CLI classify $IMAGES --labels "cat,dog,ship,truck" --model "$source" --top 2 --templates simple
done
