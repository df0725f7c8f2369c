"""Sharded checkpoints (accel_train.sharded_checkpoint) of a ~200 MB model (12 Linear layers of 2048 x 2048, fp32,
AdamW: 600 MB of state) on CPU: how long `stage_and_save` blocks the caller (first save, which allocates the staging
buffers, and a second, which reuses them), how long the background write takes, the bytes each process writes, the
memory the write and the export take above what the process held before. Prints one JSON line per measurement.

    python benchmarks/sharded_checkpoint.py [--layers 12] [--width 2048]

Runs one process without a process group, then 2 processes (torchrun, gloo) with FSDP2 and without, then the export
of the FSDP checkpoint in a fresh process. The script is its own worker (`--worker MODE DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from accel_train.sharded_checkpoint import SHARDS_DIR, ShardedState, export_consolidated  # noqa: E402

MB = 1 << 20


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class PeakRss:
    """The highest resident set size while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *args: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def model(layers: int, width: int, fsdp: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            fully_shard(layer)
        fully_shard(net)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4)  # over the sharded parameters


def worker(mode: str, folder: Path, layers: int, width: int) -> None:
    group = None
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        group = dist.new_group(backend="gloo")
    net, optimizer = model(layers, width, mode == "fsdp")
    net(torch.randn(4, width)).sum().backward()
    optimizer.step()
    state = ShardedState(net, optimizer, group)
    rank = dist.get_rank() if group is not None else 0
    for save in (1, 2):
        base = rss()
        with PeakRss() as peak:
            start = time.perf_counter()
            state.stage_and_save(folder / f"{mode}-{save}")
            blocked = time.perf_counter() - start
            state.wait()
            total = time.perf_counter() - start
        shard = sum(p.stat().st_size for p in (folder / f"{mode}-{save}" / SHARDS_DIR).glob(f"shard-{rank + 1:05d}-*"))
        record = {"mode": mode, "rank": rank, "save": save, "blocked_s": round(blocked, 3)}
        record |= {"write_s": round(total - blocked, 3), "shard_MB": round(shard / MB, 1)}
        record |= {"rss_before_MB": round(base / MB), "peak_above_MB": round((peak.peak - base) / MB)}
        print(json.dumps(record), flush=True)
    state.close()
    if group is not None:
        dist.destroy_process_group()


def export(folder: Path) -> None:
    import accel_train.checkpoint  # noqa: F401 (imported by the export; its import is not the export's memory)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    export_consolidated(folder / "fsdp-1" / SHARDS_DIR, folder / "export")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes = {p.name: round(p.stat().st_size / MB, 1) for p in (folder / "export").iterdir()}
    print(json.dumps({"export_s": round(seconds, 2), "files_MB": sizes, "peak_above_MB": round((peak - base) / MB)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--worker", nargs=2)
    parser.add_argument("--export")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), args.layers, args.width)
    if args.export:
        return export(Path(args.export))
    size = args.layers * (args.width + 1) * args.width * 4
    largest = args.width**2 * 4
    print(json.dumps({"model_MB": round(size / MB), "state_MB": round(3 * size / MB), "largest_MB": largest / MB}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sizes = ["--layers", str(args.layers), "--width", str(args.width)]
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, __file__, "--worker", "single", folder, *sizes], env=env, check=True)
        for mode in ("fsdp", "plain"):
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0"]
            torchrun += ["--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
            subprocess.run([*torchrun, __file__, "--worker", mode, folder, *sizes], env=env, check=True)
        subprocess.run([sys.executable, __file__, "--export", folder, *sizes], env=env, check=True)


if __name__ == "__main__":
    main()
