#!/usr/bin/env bash
# Train on every GPU of this machine with DDP; rerunning the same command resumes from the newest checkpoint.
#   launch/local_multi_gpu.sh OUT [more trainer flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: launch/local_multi_gpu.sh OUTPUT_DIR [trainer flags]}
shift
gpus=$(nvidia-smi --list-gpus | wc -l)
exec .venv/bin/torchrun --standalone --nproc_per_node "$gpus" accel_train/train.py \
    --output_dir "$out" --resume_from_checkpoint latest "$@"
