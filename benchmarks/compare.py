"""accel-train's speed against lerobot-train and against a bare loop, measured side by side in one run.

Every figure is a ratio of runs made alternately in this one command on this machine (machines here are noisy):
  throughput     ours, ours with `--frame_cache disk`, and `lerobot-train` (same ACT, dataset, batch, workers,
                 steps), --pairs rounds, order rotated every round; samples/s in steady state, the data-loading
                 share of a step, peak RSS (process tree); the cache's fill time (first cached run) kept apart
  overhead       our steady-state step time vs a bare forward/backward/step loop over pre-loaded batches
  checkpoint     time training is blocked per checkpoint vs a synchronous save of the same state
  resume         launch-to-first-step of a resumed run vs a fresh start
  hub upload     samples/s while a checkpoint upload runs vs while none does (benchmarks/hub_upload_stall.py)
Writes docs/benchmarks.md (the numbers come from this run, nothing is typed in).

    python benchmarks/compare.py [--pairs 3] [--steps 80] [--out docs/benchmarks.md]

At a realistic size, on one GPU (benchmarks/gpu_compare.sh; under 8 minutes on an H200): lerobot's default ACT
(ResNet-18, not pretrained: offline), 3 cameras at 480x640, bf16, throughput and memory only:

    python benchmarks/compare.py --realistic --pairs 2 --steps 120 --out docs/benchmarks_gpu.md

Larger cameras on CPU (throughput with and without the cache, lerobot-train, the bare loop only):

    python benchmarks/compare.py --image_size 480 640 --episodes 2 --batch_size 2 --pairs 2 --steps 60 \
        --out docs/benchmarks_480x640.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO = REPO / "configs" / "demo.yaml"
BATCH, LOG_FREQ, WARMUP_LOGS = 8, 10, 2  # BATCH: every benchmark's batch, unless --batch_size says otherwise


@dataclass
class Workload:
    """What both trainers train: the demo's tiny ACT on 64x64 cameras (CPU), or lerobot's default ACT on
    480x640 cameras in bf16 (--realistic, GPU)."""

    realistic: bool
    image_size: tuple[int, int] | None = None  # the demo ACT on larger cameras (CPU: throughput only)
    batch: int = BATCH

    @property
    def size(self) -> tuple[int, int]:
        return self.image_size or ((480, 640) if self.realistic else (64, 64))

    @property
    def throughput_only(self) -> bool:
        return self.realistic or self.image_size is not None

    @property
    def workers(self) -> int:
        return 8 if self.realistic else 1

    def policy(self) -> dict:
        if self.realistic:
            return {"type": "act", "pretrained_backbone_weights": None}
        return yaml.safe_load(DEMO.read_text())["policy"]

    def env(self) -> dict[str, str]:
        """Precision through Accelerate's environment: lerobot-train reads it when the policy sets none."""
        return {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16" if self.realistic else "no"}

    def describe(self) -> str:
        if self.realistic:
            return "lerobot's default ACT (ResNet-18 backbone, not pretrained), 3 cameras at 480x640, bf16"
        return f"the demo ACT (`configs/demo.yaml`), 3 cameras at {self.size[0]}x{self.size[1]}, fp32"


OUR_STEP = re.compile(r"INFO step (\d+)  loss")
LEROBOT_STEP = re.compile(r"step:(\d+) .*updt_s:([\d.]+) data_s:([\d.]+)")


@dataclass
class Run:
    """One process: when each logged step arrived, its peak resident memory (with its loader workers)."""

    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, seconds since launch)
    lines: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0

    def samples_per_s(self, batch: int) -> float:
        """Steady state: from the end of the WARMUP_LOGS-th log window to the last one."""
        (first, t0), (last, t1) = self.steps[WARMUP_LOGS - 1], self.steps[-1]
        return (last - first) * batch / (t1 - t0)


def run(command: list[str], step_pattern: re.Pattern, env: dict[str, str] | None = None) -> Run:
    result, start = Run(), time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    done = threading.Event()

    def sample_memory() -> None:
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                result.peak_rss_mb = max(result.peak_rss_mb, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    for line in process.stdout:
        now = time.perf_counter() - start
        result.lines.append(line)
        if match := step_pattern.search(line):
            result.steps.append((int(match[1]), now))
    process.wait()
    done.set()
    result.wall_s = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({process.returncode}):\n{''.join(result.lines[-30:])}")
    return result


def alternated(pairs: int, names: tuple[str, str], samples_per_s: Callable[[str, int], float]) -> dict[str, list]:
    """Samples/s of two kinds of run, `pairs` of each, the order swapped every pair: {name: [rate per pair]}."""
    rates: dict[str, list[float]] = {name: [] for name in names}
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            rates[name].append(samples_per_s(name, pair))
            print(f"pair {pair} {name}: {rates[name][-1]:.2f} samples/s", flush=True)
    return rates


def policy_flags(work: Workload) -> list[str]:
    return [f"--policy.{k}={'null' if v is None else v}" for k, v in work.policy().items()]


def ours_command(work: Workload, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "accel_train" / "train.py"), "--dataset_id", "local/piper_demo",
        "--dataset_root", str(data), *policy_flags(work), "--output_dir", str(out), "--steps", str(steps),
        "--save_freq", str(10**6), "--log_freq", str(LOG_FREQ), "--batch_size", str(work.batch),
        "--num_workers", str(work.workers), "--seed", "1000", *extra,
    ]  # fmt: skip


def lerobot_command(work: Workload, data: Path, out: Path, steps: int) -> list[str]:
    """lerobot-train with the same ACT, dataset, batch, workers and seed; no checkpoints."""
    device = "cuda" if work.realistic else "cpu"
    return [
        str(BIN / "lerobot-train"), "--dataset.repo_id=local/piper_demo", f"--dataset.root={data}",
        "--dataset.video_backend=pyav", *policy_flags(work), f"--policy.device={device}", "--policy.push_to_hub=false",
        f"--batch_size={work.batch}", f"--num_workers={work.workers}", f"--steps={steps}", f"--log_freq={LOG_FREQ}",
        "--save_checkpoint=false", "--seed=1000", "--wandb.enable=false", f"--output_dir={out}",
    ]  # fmt: skip


def our_data_share(out: Path, batch: int) -> float:
    """Mean share of a step the loop waited for the loader (records after warm-up)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][WARMUP_LOGS:]
    return statistics.mean(r["data_s"] * r["samples_per_s"] / batch for r in records)


def lerobot_data_share(result: Run) -> float:
    windows = [LEROBOT_STEP.search(line) for line in result.lines]
    windows = [m for m in windows if m][WARMUP_LOGS:]
    return statistics.mean(float(m[3]) / (float(m[2]) + float(m[3])) for m in windows)


FILLED = re.compile(r"filled (\d+) files now in ([\d.]+) s")


def throughput(work: Workload, data: Path, tmp: Path, pairs: int, steps: int) -> dict:
    """Each pair: ours, ours reading frames from the decoded-frame cache (filled by the first such run, before its
    first step; the fill time is kept apart), lerobot-train, in rotating order; on CPU also the bare loop and ours
    without workers."""
    rows: dict[str, list] = {"ours": [], "cached": [], "lerobot": [], "bare": [], "ours_inline": [], "fill_s": []}
    cache = ["--frame_cache", "disk", "--frame_cache_dir", str(tmp / "frames")]
    kinds = ("ours", "cached", "lerobot")
    for pair in range(pairs):
        for name in kinds[pair % 3 :] + kinds[: pair % 3]:
            out = tmp / f"{name}-{pair}"
            if name == "lerobot":
                result = run(lerobot_command(work, data, out, steps), LEROBOT_STEP, work.env())
                rows[name].append((result.samples_per_s(work.batch), lerobot_data_share(result), result.peak_rss_mb))
            else:
                extra = cache if name == "cached" else []
                result = run(ours_command(work, data, out, steps, *extra), OUR_STEP, work.env())
                share = our_data_share(out, work.batch)
                rows[name].append((result.samples_per_s(work.batch), share, result.peak_rss_mb))
                rows["fill_s"] += [float(m[2]) for m in map(FILLED.search, result.lines) if m]
            print(f"pair {pair} {name}: {rows[name][-1][0]:.2f} samples/s", flush=True)
        if not work.realistic:
            bare_and_inline(work, data, tmp, pair, steps, rows)
    return rows


def bare_and_inline(work: Workload, data: Path, tmp: Path, pair: int, steps: int, rows: dict) -> None:
    """The bare loop over pre-loaded batches, and for the full CPU report ours loading in the loop (no workers)."""
    bare = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bare_loop.py"), "--dataset_root", str(data), "--steps", "30",
         "--batch_size", str(work.batch)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    measured = json.loads(bare.stdout.splitlines()[-1])
    rows["bare"].append((measured["samples_per_s"], measured["load_cpu_s_per_batch"], measured["busy_cores"],
                         measured["load_s_per_batch"]))  # fmt: skip
    print(f"pair {pair} bare loop: {rows['bare'][-1][0]:.2f} samples/s", flush=True)
    if work.throughput_only:
        return
    # Ours with the loading in the loop (no workers): bare step + loading + whatever the trainer adds.
    inline = run(ours_command(work, data, tmp / f"inline-{pair}", steps // 2, "--num_workers", "0"), OUR_STEP)
    rows["ours_inline"].append(inline.samples_per_s(work.batch))
    print(f"pair {pair} ours, 0 workers: {rows['ours_inline'][-1]:.2f} samples/s", flush=True)


def resume_startup(data: Path, tmp: Path, pairs: int) -> tuple[list[float], list[float]]:
    """Seconds from launch to the first logged step: fresh start vs resume from a step-10 checkpoint."""
    base = tmp / "resume-base"
    work = Workload(realistic=False)
    run(ours_command(work, data, base, 10, "--save_freq", "10"), OUR_STEP)
    fresh, resumed = [], []
    for pair in range(pairs):
        for kind in ("fresh", "resumed") if pair % 2 == 0 else ("resumed", "fresh"):
            out = tmp / f"startup-{kind}-{pair}"
            if kind == "resumed":
                shutil.copytree(base, out)
                extra = ["--resume_from_checkpoint", "latest"]
            else:
                extra = []
            steps = 13 if kind == "resumed" else 3
            result = run(ours_command(work, data, out, steps, "--log_freq", "1", *extra), OUR_STEP)
            (fresh if kind == "fresh" else resumed).append(result.steps[0][1])
    return fresh, resumed


def checkpoint_stall(data: Path, tmp: Path, pairs: int) -> tuple[list[float], list[float]]:
    """Mean seconds training is blocked per checkpoint (ours) vs a synchronous save of the same state."""
    blocked, synchronous = [], []
    for pair in range(pairs):
        for mode in ("async", "sync") if pair % 2 == 0 else ("sync", "async"):
            result = subprocess.run(
                [sys.executable, str(REPO / "benchmarks" / "checkpoint_stall.py"), "--mode", mode,
                 "--dataset_root", str(data), "--output_dir", str(tmp / f"stall-{mode}-{pair}")],
                cwd=REPO, capture_output=True, text=True, check=True,
            )  # fmt: skip
            (blocked if mode == "async" else synchronous).append(json.loads(result.stdout.splitlines()[-1])["mean_s"])
    return blocked, synchronous


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def breakdown(rows: dict) -> str:
    """Where the time goes: samples/s of each run, data-loading share, peak RSS."""
    lines = [
        "| trainer | samples/s (each run) | data-loading share of a step | peak RSS, process tree |",
        "|---|---|---|---|",
    ]
    for name, label in (("ours", "ours"), ("cached", "ours, --frame_cache disk"), ("lerobot", "lerobot-train")):
        runs = rows[name]
        lines.append(
            f"| {label} | {', '.join(f'{r[0]:.3g}' for r in runs)} | {statistics.mean(r[1] for r in runs):.0%} "
            f"| {max(r[2] for r in runs):.0f} MiB |"
        )
    if rows["bare"]:
        lines.append(f"| bare loop (pre-loaded batches) | {', '.join(f'{r[0]:.3g}' for r in rows['bare'])} | 0% | |")
    return "\n".join(lines)


NOTES = """Data-loading share: ours, the time the loop waits for the loader (`data_s` in metrics.jsonl); lerobot-train,
its `data_s / (data_s + updt_s)`, which also counts moving the batch and normalising it. Samples/s is the steady
state between the end of the second log window and the last one, timed from when each log line arrived."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--realistic", action="store_true", help="default ACT, 480x640 cameras, bf16, on a GPU")
    parser.add_argument(
        "--image_size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="the demo ACT on cameras of this size (CPU): throughput with and without the cache only",
    )
    parser.add_argument("--batch_size", type=int, default=BATCH, help="samples per step of the throughput runs, "
                        f"with --image_size or --realistic (default {BATCH})")  # fmt: skip
    parser.add_argument("--episodes", type=int, help="episodes of the demo dataset (default 10; 4 with --realistic)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    # The run without workers trains steps // 2 steps and needs one log window past the warm-up ones.
    min_steps = 2 * LOG_FREQ * (WARMUP_LOGS + 1)
    if args.batch_size != BATCH and not (args.image_size or args.realistic):
        parser.error("--batch_size goes with --image_size or --realistic: the full CPU report's checkpoint, resume "
                     "and upload measurements use the demo config's batch of 8")  # fmt: skip
    if args.pairs < 1:
        parser.error("--pairs must be at least 1 (each pair runs every trainer once)")
    if args.steps < min_steps:
        parser.error(f"--steps must be at least {min_steps}: rates are measured after {WARMUP_LOGS} log windows "
                     f"of {LOG_FREQ} steps, and the run without workers trains half the steps")  # fmt: skip
    return args


def measure(work: Workload, pairs: int, steps: int, episodes: int | None) -> dict:
    """Every measurement of the report, runs of each kind alternated: throughput rows, and on CPU the checkpoint
    stall, the resume start-up and the Hub upload."""
    sys.path.insert(0, str(REPO))
    from accel_train import demo_dataset

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        data = demo_dataset.create(
            tmp / "piper_demo", episodes=episodes or (4 if work.realistic else 10), seed=0, image_size=work.size
        )
        measured = {"rows": throughput(work, data, tmp, pairs, steps)}
        if not work.throughput_only:
            measured["stall"] = checkpoint_stall(data, tmp, pairs)
            measured["startup"] = resume_startup(data, tmp, pairs)
    if not work.throughput_only:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from hub_upload_stall import measure as hub_upload

        measured["hub"] = hub_upload(steps=120, save_freq=20)
    return measured


def cpu_budget(rows: dict, batch: int) -> dict:
    """What loading costs the compute on these cores, from the bare-loop runs: the loader's work per batch comes
    out of the same cores the compute uses, so a step can be no faster than bare + load CPU-seconds / cores."""
    bare_sps = statistics.mean(r[0] for r in rows["bare"])
    cores = os.cpu_count() or 1
    load_cpu_s = statistics.mean(r[1] for r in rows["bare"])
    return {
        "bare_sps": bare_sps,
        "bare_step": batch / bare_sps,
        "load_cpu_s": load_cpu_s,
        "load_s": statistics.mean(r[3] for r in rows["bare"]),
        "busy_cores": statistics.mean(r[2] for r in rows["bare"]),
        "cores": cores,
        "bound": 1 + load_cpu_s / (cores * batch / bare_sps),
    }


def budget_text(n: dict, batch: int) -> str:
    return f"""What bounds the overhead ratio here, the CPU budget: producing one batch (decoding 3 videos x {batch}
frames, collating) costs {n["load_cpu_s"]:.3f} CPU-seconds, measured in the bare-loop process; a bare step takes
{n["bare_step"]:.3f} s and keeps {n["busy_cores"]:.1f} of the {n["cores"]} cores busy. When the compute keeps every core
busy, each CPU-second of loading is taken from it, however well loading overlaps compute: a step of bare +
load / cores, {n["bound"]:.2f}x the bare loop, for any trainer that loads its data on these cores. On a GPU machine
the compute leaves the CPU and this term goes to zero."""


def cpu_targets(rows: dict, measured: dict, batch: int) -> tuple[list[tuple[str, ...]], dict]:
    """The table of targets on CPU, and the numbers the text below it explains."""
    ours_sps, lerobot_sps = (statistics.mean(r[0] for r in rows[k]) for k in ("ours", "lerobot"))
    ratio = ours_sps / lerobot_sps
    n = cpu_budget(rows, batch)
    bare_sps, bound = n["bare_sps"], n["bound"]
    overhead = bare_sps / ours_sps  # our step time / bare step time
    (stall_blocked, stall_sync), (fresh, resumed), hub = measured["stall"], measured["startup"], measured["hub"]
    blocked_s, sync_s = statistics.mean(stall_blocked), statistics.mean(stall_sync)
    startup = statistics.mean(resumed) / statistics.mean(fresh)
    pair_ratios = ", ".join(f"{o[0] / t[0]:.2f}" for o, t in zip(rows["ours"], rows["lerobot"], strict=True))
    targets = [
        *cache_targets(rows, batch),
        ("throughput, ours / lerobot-train 0.6.1", ">= 1.0x", f"**{ratio:.2f}x** ({ours_sps:.3g} vs "
         f"{lerobot_sps:.3g} samples/s; pairs: {pair_ratios})", verdict(ratio, 1.0, True)),
        ("step time, ours / bare loop", "<= 1.10x", f"**{overhead:.2f}x** (bare loop {bare_sps:.3g} samples/s; "
         f"CPU budget alone: {bound:.2f}x, see below)", verdict(overhead, 1.10, False)),
        ("blocked per checkpoint / synchronous save", "<= 25%", f"**{blocked_s / sync_s:.0%}** ({blocked_s:.3f} s vs "
         f"{sync_s:.3f} s)", verdict(blocked_s / sync_s, 0.25, False)),
        ("samples/s during a Hub upload / without", ">= 0.95x", f"**{hub['ratio']:.2f}x** ({hub['during']:.1f} vs "
         f"{hub['idle']:.1f})", verdict(hub["ratio"], 0.95, True)),
        ("launch to first step, resume / fresh", "<= 1.2x", f"**{startup:.2f}x** ({statistics.mean(resumed):.1f} s "
         f"vs {statistics.mean(fresh):.1f} s)", verdict(startup, 1.2, False)),
    ]  # fmt: skip
    return targets, {**n, "saves": len(stall_blocked)}


def cache_targets(rows: dict, batch: int) -> list[tuple[str, ...]]:
    """With the decoded-frame cache: against lerobot-train and the bare loop, and the fill, amortised."""
    cached, ours, lerobot = (statistics.mean(r[0] for r in rows[k]) for k in ("cached", "ours", "lerobot"))
    pairs = ", ".join(f"{c[0] / t[0]:.2f}" for c, t in zip(rows["cached"], rows["lerobot"], strict=True))
    fill_s = sum(rows["fill_s"])
    saved_per_step = batch / ours - batch / cached
    amortised = f"{fill_s / saved_per_step:.0f} steps" if saved_per_step > 0 else "never (no step time saved)"
    result = [
        ("throughput with --frame_cache disk, ours / lerobot-train", ">= 1.15x", f"**{cached / lerobot:.2f}x** "
         f"({cached:.3g} vs {lerobot:.3g} samples/s; pairs: {pairs}; without the cache {ours / lerobot:.2f}x)",
         verdict(cached / lerobot, 1.15, True)),
        ("fill of the cache (once per machine and dataset)", "", f"{fill_s:.1f} s, repaid after {amortised}", ""),
    ]  # fmt: skip
    if rows["bare"]:
        bare = statistics.mean(r[0] for r in rows["bare"])
        result.insert(1, ("step time with --frame_cache disk, ours / bare loop", "<= 1.08x",
                          f"**{bare / cached:.2f}x** (bare loop {bare:.3g} samples/s, pre-loaded batches)",
                          verdict(bare / cached, 1.08, False)))  # fmt: skip
    return result


def cpu_report(header: str, rows: dict, measured: dict, batch: int) -> str:
    targets, n = cpu_targets(rows, measured, batch)
    table = "\n".join(f"| {' | '.join(row)} |" for row in targets)
    bare_step, load_s = n["bare_step"], n["load_s"]
    inline_sps = statistics.mean(rows["ours_inline"])
    own = (batch / inline_sps - bare_step - load_s) / bare_step  # what the trainer adds beyond compute and loading
    return f"""# Benchmarks

{header}

| measure | target | measured | |
|---|---|---|---|
{table}

## Where the time goes

{breakdown(rows)}

{NOTES} Checkpoint: {n["saves"]} runs of each kind, 5 saves each, ~130 MB
checkpoints. Resume start-up: from process launch to the first step's log line, Python and torch imports included.

{budget_text(n, batch)}

The trainer's own share, without workers: ours with `--num_workers 0` ({inline_sps:.3g}
samples/s; runs {", ".join(f"{r:.3g}" for r in rows["ours_inline"])}) takes {batch / inline_sps:.3f} s a step, against
{bare_step:.3f} s of bare step plus {load_s:.3f} s loading one batch in the same process: the trainer itself
(seeding, moving and normalising the batch, clipping, logging, tqdm) adds **{own:+.0%}** of a bare step.
"""


def realistic_report(header: str, rows: dict, work: Workload) -> str:
    """Throughput with and without the decoded-frame cache, against lerobot-train (and on CPU the bare loop)."""
    ours_sps, lerobot_sps = (statistics.mean(r[0] for r in rows[k]) for k in ("ours", "lerobot"))
    table = "\n".join(f"| {' | '.join(row)} |" for row in cache_targets(rows, work.batch))
    title = "at a realistic size (GPU)" if work.realistic else f"with {work.size[0]}x{work.size[1]} cameras (CPU)"
    budget = f"\n{budget_text(cpu_budget(rows, work.batch), work.batch)}\n" if rows["bare"] else ""
    return f"""# Benchmarks {title}

{header}

Throughput, ours / lerobot-train 0.6.1: **{ours_sps / lerobot_sps:.2f}x** ({ours_sps:.3g} vs {lerobot_sps:.3g}
samples/s).

| measure | target | measured | |
|---|---|---|---|
{table}

{breakdown(rows)}

{NOTES}
{budget}"""


def main() -> None:
    args = parse_args()
    work = Workload(args.realistic, tuple(args.image_size) if args.image_size else None, args.batch_size)
    started = time.time()
    measured = measure(work, args.pairs, args.steps, args.episodes)
    options = (
        ("--realistic " if work.realistic else "")
        + (f"--image_size {args.image_size[0]} {args.image_size[1]} " if args.image_size else "")
        + (f"--episodes {args.episodes} " if args.episodes else "")
        + (f"--batch_size {args.batch_size} " if args.batch_size != BATCH else "")
    )
    command = f"python benchmarks/compare.py {options}--pairs {args.pairs} --steps {args.steps}"
    header = f"""Written by `{command}` on {time.strftime("%Y-%m-%d", time.gmtime(started))} \
({(time.time() - started) / 60:.0f} min).
Machine: {machine()}.
Workload: {work.describe()}; the demo dataset's synthetic Piper episodes (AV1 video, PyAV decoding), batch
{work.batch}, {work.workers} loader workers, {args.steps} steps. Every ratio compares runs made alternately in this one
command."""
    rows = measured["rows"]
    if work.throughput_only:
        text = realistic_report(header, rows, work)
    else:
        text = cpu_report(header, rows, measured, work.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
