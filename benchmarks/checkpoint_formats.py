"""--checkpoint_format sharded vs consolidated on CPU, 2 processes, training lerobot's pi0 at a stand-in size
widened past 300M parameters: how long a checkpoint blocks training, the bytes each process writes and a Hub push
would upload per checkpoint, the time and peak memory of `accel-train export` of a sharded checkpoint, and whether
the export's files equal the consolidated run's, measured side by side in one run (the formats alternated).
Writes docs/benchmarks_checkpoints.md.

    python benchmarks/checkpoint_formats.py [--reps 2] [--steps 4] [--save_freq 2] [--modes FSDP [DDP]] [--sync]

Each run is benchmarks/fsdp.py's: the trainer on the demo dataset under FSDP (`accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 2` through tests/fsdp_on_cpu.py) or DDP (`torchrun`, gloo), this
script as its worker (`--worker RESULT_DIR TRAINER_ARGS...`), `Checkpointer.save` timed on every rank; here pi0 has
the sizes of WIDER and the runs differ only in --checkpoint_format. The same seed in every run: the training, and so
the checkpoints' tensors, should be the same in both formats.

    python benchmarks/checkpoint_formats.py --timed RESULT_DIR accel_train/train.py TRAINER_ARGS

runs the trainer at pi0's real size with the worker's timers (every save's blocking time in RESULT_DIR/rank<N>.json):
the launcher of tests/test_pi_checkpoint_gpu.py, which scripts/gpu_check.sh runs on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

import fsdp  # noqa: E402 (benchmarks/fsdp.py: its runs, worker and report helpers)
from fsdp import mean, size  # noqa: E402

# pi0's joint attention pairs layer i of both Gemmas: equal depth, 8 heads, equal head size (see fsdp.WIDE).
# 308.4M parameters in the PaliGemma + expert (real pi0: 2048 x 18, MLP 16384, and 1024 x 18, MLP 4096).
WIDER = {
    "gemma_2b": {"width": 1024, "depth": 8, "mlp_dim": 10240, "num_heads": 8, "num_kv_heads": 1, "head_dim": 128},
    "gemma_300m": {"width": 512, "depth": 8, "mlp_dim": 2048, "num_heads": 8, "num_kv_heads": 1, "head_dim": 128},
}
MIN_PARAMS = 300 * 10**6
# Less compute per step than benchmarks/fsdp.py's runs, for the same state (what a checkpoint costs depends on the
# parameters, not on the tokens): 1 sample per process, 56x56 cameras (16 tokens each), 16 language tokens, chunks of
# 10 actions. At that file's settings a step of this model takes about 35 s on 2 cores, 2 runs of each format 25 min.
LIGHTER = ("--batch_size", "1", "--policy.image_resolution=[56,56]", "--policy.tokenizer_max_length=16",
           "--policy.chunk_size=10", "--policy.n_action_steps=10")  # fmt: skip
FORMATS = {
    "consolidated": ("--checkpoint_format", "consolidated"),
    "sharded": ("--checkpoint_format", "sharded"),
}
# --sync: also the consolidated checkpoint written before save() returns (--async_checkpoint false), for scale.
SYNC = {"consolidated, synchronous": ("--checkpoint_format", "consolidated", "--async_checkpoint", "false")}
# What each format's runs must have timed (fsdp.worker's `parts`), so that a rename in accel_train cannot drop a
# part of the breakdown unnoticed.
TIMERS = {
    "consolidated": ("copy_s", "write_s", "publish_s"),
    "sharded": ("state_dict_s", "copy_s", "write_s", "publish_s"),
    "consolidated, synchronous": ("copy_s", "write_s", "publish_s"),
}
SHARD_RANK = re.compile(r"shard-(\d{5})-")  # accel_train.sharded_checkpoint.SHARD_FILE: process i writes shard i + 1
# The child's peak RSS (ru_maxrss, KiB on Linux), printed as the wrapper's last line: /usr/bin/time -v portably.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(code)"
)

widened = functools.partial(fsdp.widen, WIDER, fsdp.WIDE_VISION, MIN_PARAMS)


def real_size() -> int:
    """pi0 as lerobot builds it, 4B parameters (no stand-in sizes): `--timed`'s runs on a GPU."""
    return 0


# --- what a run wrote --------------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit measured, whether accel_train/ differs from it, and a hash of accel_train/'s sources (to tell
    whether they changed during the run: others may work in the same tree)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "accel_train"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    digest = hashlib.sha256()
    for path in sorted((REPO / "accel_train").rglob("*.py")):
        digest.update(path.read_bytes())
    state = "with uncommitted changes" if dirty else "as committed"
    return f"{head.stdout.strip()}, accel_train/ {state} (sources {digest.hexdigest()[:8]})"


def written(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint folder's bytes: by the process that wrote them (a shard file by its number, everything else by
    the main process), in all, and what a Hub push uploads (accel_train.hub: the manifest's files and itself)."""
    from accel_train.checkpoint import MANIFEST_FILE

    by_rank = [0, 0]
    for path in (p for p in checkpoint.rglob("*") if p.is_file()):
        shard = SHARD_RANK.match(path.name)
        by_rank[int(shard[1]) - 1 if shard else 0] += path.stat().st_size
    manifest = checkpoint / MANIFEST_FILE
    files = json.loads(manifest.read_text())["files"]
    uploaded = sum(f["size"] for f in files.values()) + manifest.stat().st_size
    return {"step": int(checkpoint.name.rsplit("-", 1)[1]), "by_rank": by_rank, "total": sum(by_rank),
            "uploaded": uploaded}  # fmt: skip


def timed_child(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of `command`, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return wall, int(done.stdout.split()[-1])


def export(checkpoint: Path, dest: Path, env: dict[str, str]) -> dict[str, Any]:
    """`accel-train export CHECKPOINT DEST` in a fresh process: its time and peak RSS, and the same for a process
    that only imports the command (its start-up)."""
    wall, peak = timed_child([sys.executable, "-m", "accel_train.cli", "export", str(checkpoint), str(dest)], env)
    startup, startup_peak = timed_child([sys.executable, "-c", "import accel_train.cli, accel_train.checkpoint"], env)
    files = {p.name: p.stat().st_size for p in dest.iterdir() if p.is_file()}
    return {"s": wall, "peak_rss": peak, "startup_s": startup, "startup_peak_rss": startup_peak, "files": files}


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """policy.safetensors and optimizer_state.pth of two folders: tensors equal bit for bit, the largest
    difference, and whether the files are byte for byte the same."""
    import filecmp

    import torch
    from safetensors import safe_open

    from accel_train.checkpoint import OPTIMIZER_FILE, POLICY_FILE

    def tensors_of(folder: Path) -> tuple[dict[str, Any], Any]:
        policy = safe_open(folder / POLICY_FILE, "pt")
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True, mmap=True)
        named = {f"policy/{k}": functools.partial(policy.get_tensor, k) for k in policy.keys()}
        for i, state in optimizer["state"].items():
            named |= {f"optimizer/{i}/{k}": functools.partial(torch.as_tensor, v) for k, v in state.items()}
        return named, optimizer["param_groups"]

    (a, groups_a), (b, groups_b) = tensors_of(ours), tensors_of(theirs)
    equal, gap = 0, 0.0
    for key in a.keys() & b.keys():
        x, y = a[key](), b[key]()
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        equal += same
        if not same and x.shape == y.shape:
            gap = max(gap, (x.double() - y.double()).abs().max().item())
    same_bytes = {n: filecmp.cmp(ours / n, theirs / n, shallow=False) for n in (POLICY_FILE, OPTIMIZER_FILE)}
    return {"tensors": len(b), "equal": equal, "missing": len(b.keys() - a.keys()), "extra": len(a.keys() - b.keys()),
            "max_abs_diff": gap, "param_groups_equal": groups_a == groups_b, "same_bytes": same_bytes}  # fmt: skip


# --- the runs -----------------------------------------------------------------------------------------------------


def run_format(mode: str, fmt: str, rep: int, tmp: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    """One training run in `fmt` (a key of args.formats): fsdp.one_run's measures, every checkpoint's bytes, and its
    last checkpoint kept (the others deleted: 3.4 GB each)."""
    name = f"{mode.lower()}-{fmt.replace(', ', '-')}-{rep}"
    variant = fsdp.Variant(script=Path(__file__), extra=(*LIGHTER, *args.formats[fmt]), keep=True)
    run = fsdp.one_run(mode, name, tmp, env, args, variant)
    out = Path(run["out"])
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    run.update(format=fmt, rep=rep, written=[written(c) for c in checkpoints], last=str(checkpoints[-1]))
    for checkpoint in checkpoints[:-1]:
        subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    recorded = {key for s in run["all_saves"] for key in s} | {
        key for rank in run["ranks"] for record in rank["background"] for key in record
    }
    if missing := [key for key in TIMERS[fmt] if key not in recorded]:
        raise SystemExit(
            f"{name} recorded no {', '.join(missing)}: accel_train's checkpoint code moved what benchmarks/fsdp.py's "
            "worker times (its `parts`); update them."
        )
    blocked, written_by = [round(s["s"], 2) for s in run["all_saves"]], run["written"][-1]["by_rank"]
    print(f"{name}: blocked {blocked} s, {run['samples_per_s']:.3f} samples/s, written "
          f"{[size(b) for b in written_by]}, wall {run['wall_s']:.0f} s", flush=True)  # fmt: skip
    return run


def one_rep(mode: str, rep: int, tmp: Path, env: dict[str, str], args: argparse.Namespace) -> list[dict]:
    """Every format (the order reversed every other rep), then the sharded checkpoint exported and compared with the
    consolidated one of the same step."""
    order = list(args.formats) if rep % 2 == 0 else list(args.formats)[::-1]
    runs = {fmt: run_format(mode, fmt, rep, tmp, env, args) for fmt in order}
    dest = tmp / f"{mode.lower()}-export-{rep}"
    sharded = runs["sharded"]
    sharded["export"] = export(Path(sharded["last"]), dest, env)
    sharded["export"]["compared"] = compare(dest, Path(runs["consolidated"]["last"]))
    print(f"{mode} export {rep}: {sharded['export']['s']:.1f} s, peak RSS {size(sharded['export']['peak_rss'])}, "
          f"{json.dumps(sharded['export']['compared'])}", flush=True)  # fmt: skip
    for path in (dest, *(Path(r["out"]) for r in runs.values())):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return [runs[fmt] for fmt in order]


# --- the report ---------------------------------------------------------------------------------------------------

# The training thread's part of a save (fsdp.worker's timers), from each run's second save; the rest is Accelerate's.
PARTS = {
    "wait_s": "waiting for the previous write",
    "state_dict_s": "taking torch's state dicts",
    "copy_s": "copying this process's part to CPU",
    "small_files_s": "small files",
    "barrier_s": "barriers (waiting for the other process)",
    "gather_s": "gathering to the main process",  # these two: in the training thread only when synchronous
    "write_s": "writing the tensors",
    "publish_s": "hashing and publishing the folder",
}

BACKGROUND = ("gather_s", "write_s", "publish_s")  # the writer threads' parts, per save


def summarize(runs: list[dict]) -> dict[str, Any]:
    """One format's measures over its runs."""
    saves = [s for r in runs for s in r["all_saves"]]
    later = [s for r in runs for s in r["all_saves"][1:]]  # the first save allocates the reused CPU buffers
    written = [w for r in runs for w in r["written"]]

    def behind(key: str, rank: int) -> float:
        """Seconds per save in `key` on process `rank`'s writer threads (a save gathers and writes several files)."""
        records = [b for r in runs for k in r["ranks"] if k["rank"] == rank for b in k["background"]]
        return sum(b.get(key, 0.0) for b in records) / len(saves)

    return {
        "block": mean(s["s"] for s in later),
        "block_all": mean(s["s"] for s in saves),
        "parts": {key: mean(s.get(key, 0.0) for s in later) for key in PARTS},
        "behind": {key: [behind(key, rank) for rank in (0, 1)] for key in BACKGROUND},
        "by_rank": [mean(w["by_rank"][rank] for w in written) for rank in (0, 1)],
        "uploaded": mean(w["uploaded"] for w in written),
        "spread": max(w["total"] for w in written) - min(w["total"] for w in written),
        "rate": mean(r["samples_per_s"] for r in runs),
        "with_saves": mean(r["with_saves"] for r in runs),
        "rss": [max(k["peak_rss"] for r in runs for k in r["ranks"] if k["rank"] == rank) for rank in (0, 1)],
    }


def later_saves(args: argparse.Namespace) -> str:
    """The saves a run's blocking time is the mean of: all but the first (which allocates the reused buffers)."""
    saves = args.steps // args.save_freq + (args.steps % args.save_freq > 0)  # and the last step's
    return "save 2" if saves == 2 else f"mean of saves 2-{saves}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def breakdown(f: dict[str, Any]) -> str:
    rest = f["block"] - sum(f["parts"].values())
    known = [f"{label} {f['parts'][key]:.2f} s" for key, label in PARTS.items() if f["parts"][key] >= 0.005]
    return ", ".join([*known, f"the rest {rest:.2f} s"])


def in_background(f: dict[str, Any]) -> str:
    return ", ".join(f"{PARTS[key]} {v[0]:.2f} s / {v[1]:.2f} s" for key in BACKGROUND if any(v := f["behind"][key]))


def two(values: list[float], unit: Any = size) -> str:
    return " / ".join(unit(v) for v in values)


def rows(f: dict[str, dict], formats: list[str], pairs: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The table's rows: label, target, each format's value, sharded / consolidated (and / synchronous)."""
    base = [fmt for fmt in formats if fmt != "sharded"]

    def line(label: str, target: str, cell: Any, compare: Any = None, first: str = "") -> tuple[str, ...]:
        ratios = [compare(f["sharded"], f[b]) if compare else "" for b in base]
        return (label, target, *(cell(f[fmt]) for fmt in formats), first or ratios[0], *ratios[1:])

    headline = f["sharded"]["block"] / f["consolidated"]["block"]
    return [
        line(f"training blocked per checkpoint (`Checkpointer.save` on the main process; {later_saves(args)} of "
             f"each run, x {args.reps} runs)", "sharded <= 0.2x consolidated",
             lambda x: f"{x['block']:.2f} s", lambda s, b: ratio(s["block"], b["block"]),
             first=f"**{headline:.2f}x**, {fsdp.verdict(headline, 0.2)} (pairs: {pairs})"),
        line("the same with each run's first save (where the reused CPU buffers are allocated)", "",
             lambda x: f"{x['block_all']:.2f} s", lambda s, b: ratio(s["block_all"], b["block_all"])),
        line(f"of which (training thread of the main process, {later_saves(args)})", "", breakdown),
        line("in the background per save, main / other process (writer threads; blocking only if the next save "
             "comes first)", "", in_background),
        line("bytes written per checkpoint, main / other process", "", lambda x: two(x["by_rank"]),
             lambda s, b: f"main {ratio(s['by_rank'][0], b['by_rank'][0])}"),
        line("bytes a Hub push uploads per checkpoint (the manifest's files and itself)", "",
             lambda x: size(x["uploaded"]), lambda s, b: ratio(s["uploaded"], b["uploaded"])),
        line(f"samples/s of the training steps (steps 2-{args.steps}, saves excluded)", "",
             lambda x: f"{x['rate']:.3f}", lambda s, b: ratio(s["rate"], b["rate"])),
        line(f"samples/s over steps 2-{args.steps} with the checkpoint stalls", "",
             lambda x: f"{x['with_saves']:.3f}", lambda s, b: ratio(s["with_saves"], b["with_saves"])),
        line("peak RSS of the whole process over the run, main / other", "", lambda x: two(x["rss"]),
             lambda s, b: f"{ratio(s['rss'][0], b['rss'][0])} / {ratio(s['rss'][1], b['rss'][1])}"),
    ]  # fmt: skip


def table(header: list[str], body: list[tuple[str, ...]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def exports_text(exports: list[dict], args: argparse.Namespace) -> str:
    policy_bytes = exports[0]["files"].get("policy.safetensors", 0)
    state_bytes = policy_bytes + exports[0]["files"].get("optimizer_state.pth", 0)
    seconds, peak = mean(e["s"] for e in exports), max(e["peak_rss"] for e in exports)
    startup, startup_peak = mean(e["startup_s"] for e in exports), max(e["startup_peak_rss"] for e in exports)
    body = [
        (str(i + 1), f"{e['s']:.1f}", size(e["peak_rss"]), f"{c['equal']} of {c['tensors']}"
         + (f" ({c['missing']} missing, {c['extra']} extra)" if c["missing"] or c["extra"] else ""),
         f"{c['max_abs_diff']:.3g}", str(c["param_groups_equal"]),
         ", ".join(f"{name} {same}" for name, same in c["same_bytes"].items()))
        for i, e in enumerate(exports) if (c := e["compared"])
    ]  # fmt: skip
    header = ["pair", "export (s)", "peak RSS", "tensors bit-identical (policy + optimizer)", "largest difference",
              "param_groups equal", "files byte-identical"]  # fmt: skip
    return f"""Export of each sharded run's last checkpoint (checkpoint-{args.steps}) with `python -m accel_train.cli
export CKPT DIR` in a fresh process (policy.safetensors, its model.safetensors link, and optimizer_state.pth, written
from the shards one tensor at a time): **{seconds:.1f} s** and a peak RSS of **{size(peak)}** (mean time, largest
peak) for {size(policy_bytes)} of weights and {size(state_bytes)} of weights + optimizer state written, i.e. a peak of
{peak / state_bytes:.2f}x the state it writes. A process that only imports the command (`import accel_train.cli,
accel_train.checkpoint`: torch, lerobot) takes {startup:.1f} s and {size(startup_peak)} of that; the export adds
{size(peak - startup_peak)} to the peak. Its files against the consolidated run's checkpoint-{args.steps} of the same
pair (the same seed):

{table(header, body)}"""


def mode_report(mode: str, runs: list[dict], args: argparse.Namespace) -> str:
    formats = list(args.formats)
    by = {fmt: [r for r in runs if r["format"] == fmt] for fmt in formats}
    f = {fmt: summarize(by[fmt]) for fmt in formats}
    pairs = ", ".join(
        ratio(mean(x["s"] for x in s["all_saves"][1:]), mean(x["s"] for x in c["all_saves"][1:]))
        for c, s in zip(by["consolidated"], by["sharded"], strict=True)
    )
    base = [fmt for fmt in formats if fmt != "sharded"]
    header = ["measure", "target", *formats, *(f"sharded / {b}" for b in base)]
    run_rows = [
        (str(i + 1), r["format"], ", ".join(f"{s['s']:.2f}" for s in r["all_saves"]),
         f"{mean(s['s'] for s in r['all_saves'][1:]):.2f}",
         ", ".join(f"{s.get('wait_s', 0.0):.2f}" for s in r["all_saves"]),
         ", ".join(f"{s.get('barrier_s', 0.0):.2f}" for s in r["all_saves"]), f"{r['samples_per_s']:.3f}",
         f"{r['wall_s']:.0f}")
        for i, r in enumerate(runs)
    ]  # fmt: skip
    run_header = ["#", "format", "every save blocked (s)", f"{later_saves(args)} (s)", "of which waiting for the "
                  "previous write (s)", "of which barriers (s)", "samples/s, steps", "run wall (s)"]  # fmt: skip
    losses = [r["losses"] for r in runs]
    same = all(x == losses[0] for x in losses)
    same_losses = "are equal, bit for bit, whatever the format" if same else "**differ** between runs"
    spread = max(x["spread"] for x in f.values())
    launch = ("`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` through "
              "tests/fsdp_on_cpu.py (FSDP2)" if mode == "FSDP" else "`torchrun --nproc_per_node 2` (gloo)")  # fmt: skip
    return f"""## {mode}: {launch}

{table(header, rows(f, formats, pairs, args))}

Each run, in the order run (seconds):

{table(run_header, run_rows)}

{exports_text([r["export"] for r in by["sharded"]], args)}

Checkpoint sizes are per checkpoint, the mean over every checkpoint of the runs (they differ by at most
{spread} bytes: trainer_state.json's numbers). Every run's per-step losses {same_losses}.

Reading.

{reading(f, [r["export"] for r in by["sharded"]])}"""


def reading(f: dict[str, dict], exports: list[dict]) -> str:
    """What the numbers say; the explanations are what the code does (accel_train.checkpoint_parts, .checkpointer,
    .sharded_checkpoint), the numbers this run's."""
    sharded, consolidated, sync = f["sharded"], f["consolidated"], f.get(next(iter(SYNC)))
    headline = sharded["block"] / consolidated["block"]
    behind = {fmt: sum(v[0] for v in x["behind"].values()) for fmt, x in (("c", consolidated), ("s", sharded))}
    peak, state = max(e["peak_rss"] for e in exports), sum(exports[0]["files"].get(n, 0) for n in (
        "policy.safetensors", "optimizer_state.pth"))  # fmt: skip
    startup = max(e["startup_peak_rss"] for e in exports)
    startup_s = mean(e["startup_s"] for e in exports)
    parity = (
        "the two are at parity here, within the runs' spread (see the pairs)"
        if 2 / 3 <= headline <= 1.5
        else f"here the sharded save blocks {'less' if headline < 1 else 'more'} all the same"
    )
    against_sync = (
        f" A synchronous consolidated save blocks {sync['block']:.2f} s (the gather, the write and the hashing in the "
        f"training thread): against it a sharded save blocks {sharded['block'] / sync['block']:.2f}x."
        if sync
        else ""
    )
    return f"""- Blocking: a sharded save blocks training {headline:.2f}x as long as the default consolidated one
  ({sharded["block"]:.2f} s vs {consolidated["block"]:.2f} s), target at most 0.2x {
        "met" if headline <= 0.2 else "missed"
    }. Under FSDP both block only while each process copies its own shards of the weights and AdamW state to
  CPU buffers kept from save to save (the sharded one also takes torch's sharded state dicts); the consolidated
  one's gathering to the main process and writing already run in the background. What differs is that background,
  not the training thread's part: {parity}.{against_sync}
- In the background (the time until the checkpoint exists, and the least time between saves before training
  waits for the previous one): the consolidated main process gathers, writes and hashes for
  {behind["c"]:.1f} s per save; sharded, each process writes its half in parallel and the main process then hashes
  every file of the folder, the other processes' shards too, for the manifest ({behind["s"]:.1f} s on the main
  process).
- Bytes: the main process writes {ratio(sharded["by_rank"][0], consolidated["by_rank"][0])} the consolidated
  format's bytes ({size(sharded["by_rank"][0])} of {size(consolidated["by_rank"][0])}), the other process the rest;
  a Hub push uploads the same ({size(sharded["uploaded"])} vs {size(consolidated["uploaded"])}: the shards hold the
  same tensors). The main process's peak RSS is {ratio(sharded["rss"][0], consolidated["rss"][0])} the consolidated
  run's: it no longer holds the gathered full state.
- Export: {mean(e["s"] for e in exports):.1f} s (of which {startup_s:.1f} s start-up) for {size(state)} written, at a
  peak RSS of {size(peak)}, of which
  the imports (torch, lerobot) take {size(startup)}: the export itself holds about one tensor at a time, whatever
  the model's size. Its policy.safetensors is the consolidated run's file byte for byte; its optimizer_state.pth
  holds the same tensors and hyperparameters, in other bytes of torch.save's framing only (checked on a small
  model): the zip records are named after the file written (`.optimizer_state.pth/` for the export's temporary
  file, `optimizer_state/` in the checkpoint), the export's pickle (of shapes only, the bytes filled in after)
  memoizes the device name differently, and its serialization id differs."""


def report(args: argparse.Namespace, runs: list[dict], started: float, wall: float) -> str:
    from compare import machine

    vision = fsdp.WIDE_VISION
    sections = [
        f"""# Checkpoint formats: sharded vs consolidated (CPU, 2 processes)

Written by `{command(args)}` on {time.strftime("%Y-%m-%d", time.gmtime(started))} ({wall / 60:.1f} min).
Machine: {machine()}. Code: commit {args.code}{changed(args)}.

Workload: lerobot's pi0 widened to **{runs[0]["ranks"][0]["parameters"] / 1e6:.1f}M parameters**, all trainable,
float32, random weights, AdamW (a checkpoint: {size(runs[0]["written"][0]["total"])}): tests/pi_stand_in.py's patch
with the sizes of `WIDER` in benchmarks/checkpoint_formats.py (PaliGemma's Gemma {gemma(WIDER["gemma_2b"])}; action
expert {gemma(WIDER["gemma_300m"])}; SigLIP {vision["hidden_size"]} x {vision["num_hidden_layers"]}). The runs of
benchmarks/fsdp.py (`one_run`: the demo dataset, 2 episodes, 1 thread per process, the same seed in every run) with
less compute per step (`LIGHTER`: batch 1 per process, cameras at 56x56, 16 language tokens, chunks of 10 actions;
what a checkpoint costs depends on the state, not on the tokens), {args.steps} steps, a checkpoint every
{args.save_freq} steps, differing only in their checkpoint options: consolidated (the default, asynchronous: each
process copies its part of the state to CPU, the writer threads gather it to the main process, which writes
policy.safetensors and optimizer_state.pth), sharded (each process copies its part and writes it under shards/ in a
writer thread){sync_text(args)}. {args.reps} runs of each, alternated (the order reverses every rep), so drift and
the machine's other load hit all."""
    ]
    for mode in args.modes:
        sections.append(mode_report(mode, [r for r in runs if r["mode"] == mode], args))
    sections.append("""## On a GPU

`scripts/gpu_check.sh` saves and resumes sharded checkpoints of pi0 at its real size (4B parameters) on one GPU,
with bf16 weights and the action expert trained (tests/test_pi_checkpoint_gpu.py says why), and reports how long a
sharded and a consolidated save block training in docs/gpu_check.md.""")
    return "\n\n".join(sections) + "\n"


def changed(args: argparse.Namespace) -> str:
    now = code_version()
    return "" if now == args.code else f" (**during the run it became {now}**: the runs measured different code)"


def sync_text(args: argparse.Namespace) -> str:
    if len(args.formats) == len(FORMATS):
        return ""
    return ", and for scale the consolidated checkpoint written before `save` returns (`--async_checkpoint false`)"


def command(args: argparse.Namespace) -> str:
    sync = " --sync" if len(args.formats) > len(FORMATS) else ""
    return (f"python benchmarks/checkpoint_formats.py --reps {args.reps} --steps {args.steps} --save_freq "
            f"{args.save_freq} --modes {' '.join(args.modes)}{sync}")  # fmt: skip


def gemma(sizes: dict[str, int]) -> str:
    return (f"{sizes['width']} wide x {sizes['depth']} layers, MLP {sizes['mlp_dim']}, {sizes['num_heads']} heads of "
            f"{sizes['head_dim']}, {sizes['num_kv_heads']} KV head")  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return fsdp.worker(Path(sys.argv[2]), sys.argv[3:], widened)
    if sys.argv[1:2] == ["--timed"]:  # a launcher: --timed RESULT_DIR accel_train/train.py ARGS (the script unused)
        return fsdp.worker(Path(sys.argv[2]), sys.argv[4:], real_size)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save_freq", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=fsdp.MODES, default=["FSDP"])
    parser.add_argument("--sync", action="store_true", help="also consolidated with --async_checkpoint false")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_checkpoints.md")
    parser.add_argument("--logs", type=Path, help="keep each run's output here (default: discarded)")
    args = parser.parse_args()
    args.formats = {**FORMATS, **(SYNC if args.sync else {})}
    args.code = code_version()

    def runs_in(tmp: Path, env: dict[str, str]) -> Iterator[dict]:
        for mode in args.modes:
            for rep in range(args.reps):
                yield from one_rep(mode, rep, tmp, env, args)

    fsdp.run_all(args, runs_in, report)


if __name__ == "__main__":
    main()
