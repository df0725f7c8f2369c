"""A two-dataset mix vs the same data as one local dataset: accel-train's samples/s, side by side in one run.
Writes docs/benchmarks_dataset_mix.md.

The two datasets are demo datasets of 10 episodes each (seeds 0 and 1); the single dataset is lerobot's
`aggregate_datasets` of the two, so both runs train on the same frames, the same policy and the same batch.

    python benchmarks/dataset_mix.py [--pairs 2] [--steps 60] [--out docs/benchmarks_dataset_mix.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from compare import BATCH, LOG_FREQ, OUR_STEP, alternated, machine, run  # noqa: E402

EPISODES = 10


def command(roots: list[Path], out: Path, steps: int) -> list[str]:
    ids = ",".join(["local/piper_demo"] * len(roots))
    return [
        sys.executable, str(REPO / "accel_train" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
        "--demo_dataset=false", f"--dataset.repo_id=[{ids}]", f"--dataset.root=[{','.join(map(str, roots))}]",
        "--output_dir", str(out), "--steps", str(steps), "--save_freq", str(10**6), "--log_freq", str(LOG_FREQ),
        "--batch_size", str(BATCH), "--num_workers", "1", "--val_episodes", "0", "--dataset.video_backend=pyav",
    ]  # fmt: skip


def datasets(tmp: Path) -> tuple[list[Path], Path]:
    """The two demo datasets, and their aggregate as one dataset."""
    from lerobot.datasets.aggregate import aggregate_datasets

    from accel_train import demo_dataset

    parts = [demo_dataset.create(tmp / f"part{seed}", episodes=EPISODES, seed=seed) for seed in (0, 1)]
    whole = tmp / "whole"
    with demo_dataset.scheduling_kept():
        aggregate_datasets(["local/piper_demo"] * 2, "local/piper_demo", roots=parts, aggr_root=whole)
    return parts, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_dataset_mix.md")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        parts, whole = datasets(tmp)

        def rate(name: str, pair: int) -> float:
            roots = parts if name == "mix" else [whole]
            return run(command(roots, tmp / f"{name}-{pair}", args.steps), OUR_STEP).samples_per_s(BATCH)

        rates = alternated(args.pairs, ("mix", "one"), rate)
    ratio = statistics.mean(rates["mix"]) / statistics.mean(rates["one"])
    pairs = ", ".join(f"{m / o:.2f}" for m, o in zip(rates["mix"], rates["one"], strict=True))
    text = f"""# Datasets benchmark: a mix of two datasets vs the same data as one

Written by `python benchmarks/dataset_mix.py --pairs {args.pairs} --steps {args.steps}` on
{time.strftime("%Y-%m-%d", time.gmtime(started))} ({(time.time() - started) / 60:.0f} min). Machine: {machine()}.
Workload: the demo ACT (`configs/demo.yaml`) on two demo datasets of {EPISODES} episodes (3 AV1 cameras at 64x64)
given as `--dataset.repo_id='[A,B]' --dataset.root='[A,B]'`, against lerobot's `aggregate_datasets` of the two
as one local dataset; batch {BATCH}, 1 loader worker, {args.steps} steps; runs alternated in this one command.

| measure | target | measured |
|---|---|---|
| samples/s, two-dataset mix / one dataset | >= 0.9x | **{ratio:.2f}x** ({statistics.mean(rates["mix"]):.1f} vs {statistics.mean(rates["one"]):.1f}; pairs: {pairs}) |

Streaming (`--dataset.streaming=true`) is not measured: it is not supported yet (see the README's Datasets section).
"""  # noqa: E501
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
