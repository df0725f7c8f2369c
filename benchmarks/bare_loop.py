"""The floor for the trainer's step time: the same demo ACT, optimizer and batch, stepped in a bare loop over
batches pre-loaded (decoded, normalised) into memory, so no data loading and no trainer around it.

Also measures what loading costs: the CPU seconds (all threads) spent producing one batch (video decoding,
collation), the work a trainer's loader workers do on the same cores as the compute.

    python benchmarks/bare_loop.py --dataset_root DIR [--steps 30] [--batch_size N]
                          prints {"samples_per_s": ..., "load_cpu_s_per_batch": ..., "load_s_per_batch": ..., ...}
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from accel_train import config  # noqa: E402
from accel_train.data import images_to_float, load_datasets  # noqa: E402
from accel_train.model import build_optimizer, build_policy, build_processors  # noqa: E402

WARMUP, PRELOADED = 5, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_root", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, help="default: the demo config's")
    args = parser.parse_args()
    batch = ["--batch_size", str(args.batch_size)] if args.batch_size is not None else []
    cfg = config.parse(["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", "/nonexistent",
                        "--dataset_root", str(args.dataset_root), "--demo_dataset=false", *batch])  # fmt: skip
    cfg.policy.device = "cpu"
    torch.manual_seed(cfg.seed)
    (dataset,) = load_datasets(cfg.dataset.sources(), cfg, cfg.dataset.image_transforms)
    policy = build_policy(cfg, dataset, None)
    preprocessor, _ = build_processors(cfg, dataset, None, None)
    optimizer, _ = build_optimizer(cfg, policy)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)
    next(iter(loader))  # warm the decoder up (opening the video files)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    raw = list(itertools.islice(loader, PRELOADED))  # what loader workers do
    load_cpu_s = (time.process_time() - cpu_start) / PRELOADED
    load_s = (time.perf_counter() - wall_start) / PRELOADED
    batches = [preprocessor(images_to_float(b, torch.device("cpu"))) for b in raw]
    policy.train()
    for step in range(WARMUP + args.steps):
        if step == WARMUP:
            start, cpu_start = time.perf_counter(), time.process_time()
        loss, _ = policy(batches[step % PRELOADED])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optimizer.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    busy_cores = (time.process_time() - cpu_start) / wall  # how many cores the compute keeps busy
    samples_per_s = args.steps * cfg.batch_size / wall
    print(json.dumps({"samples_per_s": samples_per_s, "load_cpu_s_per_batch": load_cpu_s, "load_s_per_batch": load_s,
                      "busy_cores": busy_cores}))  # fmt: skip


if __name__ == "__main__":
    main()
