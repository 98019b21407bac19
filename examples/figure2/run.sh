#!/usr/bin/env bash
# Figure 2 of the paper at small scale: zero-shot accuracy against images processed for the three
# objectives, two seeds each, then the plot and the efficiency table.
#   bash examples/figure2/run.sh            # ~25 min on 2 CPU cores (the two seeds run side by side)
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIPFORGE=${CLIPFORGE:-.venv/bin/clipforge}
for objective in contrastive bow_prediction caption_lm; do
  for seed in 0 1; do  # one thread each, two processes: no oversubscription on 2 cores
    "$CLIPFORGE" train --config examples/figure2/train.toml --objective "$objective" --seed "$seed" \
      --threads 1 --output-dir "runs/figure2/$objective-seed$seed" &
  done
  wait
done
.venv/bin/python examples/figure2/plot.py runs/figure2 --out docs/figure2
