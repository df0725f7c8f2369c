"""What the decoded-frame cache buys: decode cost per frame, fill time, and training samples/s with and without it.

    python benchmarks/frame_cache.py [--size 64 64] [--episodes 4] [--pairs 3] [--steps 40] [--workers 1]
    python benchmarks/frame_cache.py --realistic --size 480 640 --pairs 2 --steps 60    (one GPU)

1. Decoding: each video file of the dataset decoded sequentially (the cache's fill) vs lerobot's random access
   (`decode_video_frames` per frame, in shuffled order, as training reads them), CPU seconds per frame.
2. Fill and load: `frame_cache.attach` into an empty store, its size, and CPU ms per sample (all cameras, the
   dataset in shuffled order) decoding vs from the store.
3. Training: accel-train on the demo ACT (lerobot's default ACT in bf16 with --realistic), `--frame_cache off`
   vs `disk` (the store filled beforehand), runs alternated, order swapped every pair; steady-state samples/s
   and the loop's wait for data (`data_s`); CPU seconds of each run (trainer and workers), whose difference per
   step is the CPU the cache frees for the compute, a measure less disturbed than samples/s by other load.
Prints one JSON line at the end. Machines here are shared and noisy: compare the ratios of runs made side by
side in one command, not absolute numbers across commands.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import OUR_STEP, Workload, ours_command, run  # noqa: E402

from accel_train import demo_dataset, frame_cache  # noqa: E402

WARMUP_RECORDS = 2


def decode_costs(root: Path) -> dict[str, float]:
    """CPU seconds per frame: sequential decode of every file vs lerobot's per-frame random access."""
    from lerobot.datasets.video_utils import decode_video_frames

    sequential_s, random_s, frames = 0.0, 0.0, 0
    for path in sorted(root.glob("videos/*/*/*.mp4")):
        start = time.process_time()
        timestamps = [ts for ts, _ in frame_cache.decode_sequentially(path)]
        sequential_s += time.process_time() - start
        order = random.Random(0).sample(timestamps, len(timestamps))
        start = time.process_time()
        for ts in order:
            decode_video_frames(path, [ts], 1e-4, "pyav", return_uint8=True)
        random_s += time.process_time() - start
        frames += len(timestamps)
    return {
        "frames": frames,
        "sequential_ms_per_frame": 1000 * sequential_s / frames,
        "random_ms_per_frame": 1000 * random_s / frames,
        "random_over_sequential": random_s / sequential_s,
    }


def item_cpu_ms(dataset) -> float:
    """CPU milliseconds per `dataset[i]` (all cameras), over the dataset in shuffled order."""
    order = random.Random(0).sample(range(len(dataset)), len(dataset))
    start = time.process_time()
    for i in order:
        dataset[i]
    return 1000 * (time.process_time() - start) / len(order)


def fill_and_load(root: Path, cache_dir: Path) -> dict[str, float]:
    """The fill's time and size, and what one sample costs to load without and with the store."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("local/piper_demo", root=root, video_backend="pyav", return_uint8=True)
    decoding_ms = item_cpu_ms(dataset)
    start = time.perf_counter()
    report = frame_cache.attach(dataset, "disk", cache_dir)
    fill_s = time.perf_counter() - start
    assert len(report.cached) == report.files_total, report.describe()
    cached_ms = item_cpu_ms(dataset)
    return {
        "fill_s": fill_s,
        "store_mb": report.bytes_cached / 2**20,
        "videos_mb": sum(p.stat().st_size for p in root.glob("videos/*/*/*.mp4")) / 2**20,
        "sample_cpu_ms_decoding": decoding_ms,
        "sample_cpu_ms_cached": cached_ms,
        "sample_decoding_over_cached": decoding_ms / cached_ms,
    }


def steady(out: Path) -> tuple[float, float]:
    """Samples/s between the WARMUP_RECORDS-th log record and the last, and the mean data_s per step there."""
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    first, last = records[WARMUP_RECORDS - 1], records[-1]
    samples_per_s = (last["samples_seen"] - first["samples_seen"]) / (last["time"] - first["time"])
    return samples_per_s, statistics.mean(r["data_s"] for r in records[WARMUP_RECORDS:])


def training(work: Workload, root: Path, tmp: Path, args: argparse.Namespace, workers: int) -> dict:
    """Ours with and without the cache (--frame_cache disk), runs alternated, --pairs pairs of --steps steps."""
    pairs, steps, log_freq, cache_dir = args.pairs, args.steps, args.log_freq, tmp / "cache"
    more = ["--batch_size", str(args.batch_size)] if args.batch_size else []
    rows: dict[str, list[tuple[float, float, float]]] = {"off": [], "disk": []}
    for pair in range(pairs):
        for mode in ("off", "disk") if pair % 2 == 0 else ("disk", "off"):
            out = tmp / f"{mode}-{pair}"
            extra = ["--num_workers", str(workers), "--log_freq", str(log_freq), "--frame_cache", mode]
            command = ours_command(work, root, out, steps, *extra, "--frame_cache_dir", str(cache_dir), *more)
            cpu_before = children_cpu_s()
            run(command, OUR_STEP, work.env())
            rows[mode].append((*steady(out), children_cpu_s() - cpu_before))
            print(f"pair {pair} cache {mode}: {rows[mode][-1][0]:.2f} samples/s", flush=True)
    ratios = [d[0] / o[0] for d, o in zip(rows["disk"], rows["off"], strict=True)]
    cpu = {mode: statistics.mean(r[2] for r in rows[mode]) for mode in rows}
    return {
        "samples_per_s": {mode: [round(r[0], 2) for r in rows[mode]] for mode in rows},
        "data_s_per_step": {mode: [round(r[1], 4) for r in rows[mode]] for mode in rows},
        "cpu_s_per_run": {mode: [round(r[2], 1) for r in rows[mode]] for mode in rows},
        "cache_over_decode": round(statistics.median(ratios), 3),
        "pair_ratios": [round(r, 3) for r in ratios],
        "cpu_s_saved_per_step": round((cpu["off"] - cpu["disk"]) / steps, 4),
        "cpu_off_over_disk": round(cpu["off"] / cpu["disk"], 3),
    }


def children_cpu_s() -> float:
    """CPU seconds of every finished child process (a trainer and its loader workers), user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log_freq", type=int, default=5)
    parser.add_argument("--batch_size", type=int, help="per-device batch (default: compare.py's, 8)")
    parser.add_argument("--workers", type=int, help="loader workers (default: 1, 8 with --realistic)")
    parser.add_argument(
        "--realistic", action="store_true", help="lerobot's default ACT in bf16 on a GPU (compare.py --realistic)"
    )
    parser.add_argument("--dataset_root", type=Path, help="an existing demo dataset (default: created here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="frame-cache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = args.dataset_root or demo_dataset.create(tmp / "data", args.episodes, image_size=tuple(args.size))
        shape = json.loads((root / "meta" / "info.json").read_text())["features"]["observation.images.front"]["shape"]
        result = {"image_shape": shape, "decode": decode_costs(root), "fill": fill_and_load(root, tmp / "cache")}
        print(json.dumps(result), flush=True)
        if args.pairs:
            work = Workload(realistic=args.realistic)
            workers = work.workers if args.workers is None else args.workers
            result["training"] = training(work, root, tmp, args, workers)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
