#!/usr/bin/env bash
# Realistic-size comparison on one GPU (under 8 minutes on an H200): ours vs lerobot-train 0.6.1 with lerobot's
# default ACT (ResNet-18, not pretrained: offline), 3 cameras at 480x640, bf16, 8 loader workers, 2 pairs of
# 120-step runs in alternation. Writes docs/benchmarks_gpu.md. Then the decoded-frame cache on the same workload:
# decode cost, fill time, samples/s with --frame_cache disk vs off (2 pairs of 60-step runs), into
# docs/benchmarks_gpu_frame_cache.json (not run on a GPU yet).
#   bash benchmarks/gpu_compare.sh        (after `make .venv/.installed`, or with the venv carried along)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -c 'import torch; assert torch.cuda.is_available(), "benchmarks/gpu_compare.sh needs a GPU"'
"$py" benchmarks/compare.py --realistic --pairs 2 --steps 120 --out docs/benchmarks_gpu.md
"$py" benchmarks/frame_cache.py --realistic --size 480 640 --episodes 4 --pairs 2 --steps 60 \
    | tail -n 1 > docs/benchmarks_gpu_frame_cache.json
