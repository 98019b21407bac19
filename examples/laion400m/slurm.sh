#!/bin/bash
# LAION-400M ViT-B/32 with clipforge under SLURM: 32 nodes x 4 GPUs, one process per GPU started by srun.
# clipforge reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID as rank / world size / local rank, so no torchrun.
#   sbatch examples/laion400m/slurm.sh                       # from the repository root
#   sbatch examples/laion400m/slurm.sh --lr 1e-3              # any training field can be overridden
# Time limit or preemption: SLURM sends SIGTERM 300 s early (--signal); each process finishes its step, saves a
# checkpoint (copied to remote_sync), and exits 143; the job then requeues itself and resume = "auto" continues.
#SBATCH --job-name=clipforge-laion400m
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x_%j.out

set -u
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=1  # the data workers are the CPU parallelism

# Every task must see all 4 GPUs of its node (it picks cuda:SLURM_LOCALID): no --gpus-per-task/--accel-bind.
srun --kill-on-bad-exit=1 python -m clipforge train --config examples/laion400m/train.toml "$@"
status=$?
if [ "$status" -eq 143 ]; then  # stopped by SIGTERM after a checkpoint: continue in a new allocation
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
