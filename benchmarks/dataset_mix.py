"""A two-dataset mix, and a dataset streamed from a Hub, vs the same data as one local dataset: accel-train's
samples/s, side by side in one run. Writes docs/benchmarks_dataset_mix.md.

The two datasets are demo datasets of 10 episodes each (seeds 0 and 1); the single dataset is lerobot's
`aggregate_datasets` of the two, so every run trains on the same frames, the same policy and the same batch. The
streamed run reads that single dataset with `--dataset.streaming=true` from the tests' local Hub server
(tests/hub_server.py, in this process, over HTTP on the loopback), with the real huggingface_hub client.

    python benchmarks/dataset_mix.py [--pairs 2] [--steps 60] [--out docs/benchmarks_dataset_mix.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test Hub speaks plain LFS; huggingface_hub reads this at import

from compare import BATCH, LOG_FREQ, OUR_STEP, alternated, machine, run  # noqa: E402
from hub_server import HubServer, publish_dataset  # noqa: E402

EPISODES = 10


def command(out: Path, steps: int, *dataset: str) -> list[str]:
    return [
        sys.executable, str(REPO / "accel_train" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
        "--demo_dataset=false", *dataset, "--output_dir", str(out), "--steps", str(steps), "--save_freq",
        str(10**6), "--log_freq", str(LOG_FREQ), "--batch_size", str(BATCH), "--num_workers", "1",
        "--val_episodes", "0", "--dataset.video_backend=pyav",
    ]  # fmt: skip


def local(roots: list[Path]) -> list[str]:
    ids = ",".join(["local/piper_demo"] * len(roots))
    return [f"--dataset.repo_id=[{ids}]", f"--dataset.root=[{','.join(map(str, roots))}]"]


def served(hub: HubServer, root: Path, home: Path) -> tuple[list[str], dict[str, str]]:
    """The dataset at `root` published on `hub` (tagged with its codebase version, as lerobot opens it), and the
    flags and environment that stream it from there."""
    from huggingface_hub import HfApi

    repo_id = f"{hub.user}/piper_whole"
    publish_dataset(HfApi(endpoint=hub.url, token=hub.token), repo_id, root)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(home),
           "HF_LEROBOT_HOME": str(home / "lerobot"), "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
    return [f"--dataset.repo_id={repo_id}", "--dataset.root=null", "--dataset.streaming=true"], env


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
    with tempfile.TemporaryDirectory() as scratch, HubServer() as hub:
        tmp = Path(scratch)
        parts, whole = datasets(tmp)
        streamed, env = served(hub, whole, tmp / "home")
        flags = {"mix": (local(parts), None), "one": (local([whole]), None), "streamed": (streamed, env)}
        flags["one-again"] = flags["one"]

        def rate(name: str, pair: int) -> float:
            dataset, environment = flags[name]
            result = run(command(tmp / f"{name}-{pair}", args.steps, *dataset), OUR_STEP, environment)
            if len(result.steps) < 2:
                raise SystemExit(f"The {name} run logged no steady state:\n" + "".join(result.lines[-20:]))
            return result.samples_per_s(BATCH)

        rates = alternated(args.pairs, ("mix", "one"), rate)
        rates |= alternated(args.pairs, ("streamed", "one-again"), rate)
    print(report(args, rates, started))


def report(args: argparse.Namespace, rates: dict[str, list[float]], started: float) -> str:
    rows = []
    for name, base, what in (("mix", "one", "two-dataset mix"), ("streamed", "one-again", "streamed from the Hub")):
        ratio = statistics.mean(rates[name]) / statistics.mean(rates[base])
        pairs = ", ".join(f"{a / b:.2f}" for a, b in zip(rates[name], rates[base], strict=True))
        mean, one = statistics.mean(rates[name]), statistics.mean(rates[base])
        rows.append(f"| samples/s, {what} / one local dataset | >= 0.9x | **{ratio:.2f}x** ({mean:.1f} vs {one:.1f}; "
                    f"pairs: {pairs}) |")  # fmt: skip
    text = f"""# Datasets benchmark: a two-dataset mix, and a streamed dataset, vs the same data as one local dataset

Written by `python benchmarks/dataset_mix.py --pairs {args.pairs} --steps {args.steps}` on
{time.strftime("%Y-%m-%d", time.gmtime(started))} ({(time.time() - started) / 60:.0f} min). Machine: {machine()}.
Workload: the demo ACT (`configs/demo.yaml`) on two demo datasets of {EPISODES} episodes (3 AV1 cameras at 64x64)
given as `--dataset.repo_id='[A,B]' --dataset.root='[A,B]'`, against lerobot's `aggregate_datasets` of the two
as one local dataset; then that one dataset streamed (`--dataset.streaming=true`) from the tests' Hub server
(tests/hub_server.py, serving from the benchmark's own process over the loopback, on the same cores) against it
read locally again. Batch {BATCH}, 1 loader worker, {args.steps} steps; each pair of runs alternated in this one
command, the order swapped every pair.

| measure | target | measured |
|---|---|---|
{chr(10).join(rows)}

A streamed run reads each sample's frames with range requests (2 MiB blocks, cached per file in each loader
worker); the loopback has no latency, so on a real network expect the streamed rate to depend on latency and
on `--num_workers`.
"""
    args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
