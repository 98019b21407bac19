#!/bin/bash
# LAION-400M ViT-B/32 with clipforge on any cluster: run this once on every node, same MASTER_ADDR everywhere.
#   MASTER_ADDR=node001 bash examples/laion400m/torchrun.sh            # on each of the 32 nodes
#   MASTER_ADDR=node001 NNODES=1 bash examples/laion400m/torchrun.sh --global_batch_size 1024   # 4-GPU smoke test
# A crashed worker restarts all of them (--max-restarts); each restart resumes from the newest checkpoint.
# On SIGTERM torchrun asks the workers to stop and waits --shutdown-timeout seconds for the final checkpoint
# (torchrun's default is 30 s); with an older torch that lacks the flag, drop it.
set -eu
: "${MASTER_ADDR:?set MASTER_ADDR to the hostname of the first node}"
NNODES=${NNODES:-32}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
export OMP_NUM_THREADS=1

torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" --rdzv_id "${RUN_ID:-laion400m-vit-b-32}" \
    --max-restarts 3 --shutdown-timeout 240 \
    -m clipforge train --config "$(dirname "$0")/train.toml" "$@"
