#!/usr/bin/env bash
# Realistic-size comparison on one GPU (meant to fit 8 minutes on an H200; not run on a GPU yet): ours, ours with
# --frame_cache disk, and lerobot-train 0.6.1, with lerobot's default ACT (ResNet-18, not pretrained: offline),
# 3 cameras at 480x640, bf16, 8 loader workers, 2 rounds of 120-step runs in rotating order; the cache's fill time
# apart. Writes docs/benchmarks_gpu.md. (benchmarks/frame_cache.py --realistic measures decode costs per frame.)
#   bash benchmarks/gpu_compare.sh        (after `make .venv/.installed`, or with the venv carried along)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -c 'import torch; assert torch.cuda.is_available(), "benchmarks/gpu_compare.sh needs a GPU"'
"$py" benchmarks/compare.py --realistic --pairs 2 --steps 120 --out docs/benchmarks_gpu.md
