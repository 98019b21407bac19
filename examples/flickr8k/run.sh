#!/usr/bin/env bash
# The paper at small scale: train a CLIP from scratch on the Flickr8k training split on 2 CPU cores,
# then evaluate it: Flickr8k test retrieval (1,000 images, 5,000 captions), zero-shot CIFAR-10 and
# Fashion-MNIST, and a linear probe on CIFAR-10. Results: $OUT/eval/summary.md and one JSON per eval;
# training curve: $OUT/training_curves.png. Re-running resumes (or just re-evaluates) the same run;
# delete $OUT to start over.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/flickr8k}
CLIPFORGE=${CLIPFORGE:-.venv/bin/clipforge}
for need in flickr8k/captions.tsv cifar10/test fashion-mnist; do
    [ -e "$DATA/$need" ] || { echo "missing $DATA/$need: set DATA to the folder holding flickr8k/, cifar10/, fashion-mnist/" >&2; exit 2; }
done
start=$(date +%s)
"$CLIPFORGE" train --config examples/flickr8k/train.toml --output_dir "$OUT" \
    --data.path "$DATA/flickr8k/captions.tsv" --data.image_root "$DATA/flickr8k/images" \
    --eval "retrieval:flickr8k=$DATA/flickr8k/captions.tsv,split=val;zero_shot:cifar10=$DATA/cifar10,max_samples=2000;zero_shot:fashion-mnist=$DATA/fashion-mnist,max_samples=2000"
trained=$(date +%s)
checkpoint=$(ls "$OUT"/checkpoints/step_*.pt | sort | tail -n 1)
"$CLIPFORGE" eval --model "$checkpoint" --output "$OUT/eval" --no-progress \
    --retrieval "flickr8k=$DATA/flickr8k/captions.tsv" \
    --zero-shot "cifar10=$DATA/cifar10" --zero-shot "fashion-mnist=$DATA/fashion-mnist" \
    --linear-probe "cifar10=$DATA/cifar10"
done_at=$(date +%s)
printf '{"train_seconds": %d, "eval_seconds": %d, "total_seconds": %d, "checkpoint": "%s"}\n' \
    $((trained - start)) $((done_at - trained)) $((done_at - start)) "$checkpoint" | tee "$OUT/wall_time.json"
cat "$OUT/eval/summary.md"
