"""FSDP2 vs DDP on CPU, 2 processes each, training the pi0 policy at a stand-in size widened past 100M parameters:
how long a checkpoint blocks training, samples/s, and the bytes of parameters + gradients + optimizer state each
process holds, measured side by side in one run (the two modes alternated). Writes docs/benchmarks_fsdp.md.

    python benchmarks/fsdp.py [--reps 2] [--steps 8] [--save_freq 2] [--out docs/benchmarks_fsdp.md]

Each run is the trainer on the demo dataset, launched as a user launches it: DDP with
`torchrun --nproc_per_node 2` (gloo), FSDP with `accelerate launch --config_file configs/accelerate/fsdp.yaml
--num_processes 2` through tests/fsdp_on_cpu.py (Accelerate turns FSDP on for GPUs only). The script runs itself
as the trainer script in worker mode (`--worker RESULT_DIR TRAINER_ARGS...`): lerobot's pi0 at the sizes of WIDE
(tests/pi_stand_in.py's patch with other numbers), `Checkpointer.save` timed on every rank, and the trainer's own
`sharding.footprint` of the prepared policy and optimizer taken in both modes (under DDP each process holds all).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

# lerobot's joint attention reshapes to 8 heads and pairs layer i of both models: equal depth, heads, head size.
# Real pi0: 2048 wide x 18 layers (MLP 16384) and 1024 x 18 (MLP 4096), head size 256; a quarter-ish of that here.
WIDE = {
    "gemma_2b": {"width": 640, "depth": 8, "mlp_dim": 5632, "num_heads": 8, "num_kv_heads": 1, "head_dim": 64},
    "gemma_300m": {"width": 320, "depth": 8, "mlp_dim": 1280, "num_heads": 8, "num_kv_heads": 1, "head_dim": 64},
}
WIDE_VISION = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
IMAGE_SIZE = 112  # pi0 resizes (with padding) every camera to this: 64 tokens each at SigLIP's 14-pixel patches
MIN_PARAMS = 100 * 10**6
BATCH = 2
SHIM = REPO / "tests" / "fsdp_on_cpu.py"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
MODES = ("DDP", "FSDP")
SMALL_PARTS = ("SchedulerState", "ScalerState", "TrainerFile", "ConfigFiles", "ProcessorFiles")  # checkpoint_parts


# --- worker: one process of a training run ---------------------------------------------------------------------


def widen(gemma: dict[str, dict] = WIDE, vision: dict[str, int] = WIDE_VISION, min_params: int = MIN_PARAMS) -> int:
    """tests/pi_stand_in.py's patch of lerobot's pi0 modules, with the sizes `gemma` (by variant) and `vision` (WIDE
    and WIDE_VISION unless given); returns the parameters of the PaliGemma + expert it builds (on the meta device),
    which must be at least `min_params`."""
    import pi_stand_in
    import torch
    from lerobot.policies.pi0 import modeling_pi0

    pi_stand_in.GEMMA.update({variant: dict(sizes) for variant, sizes in gemma.items()})
    pi_stand_in.VISION.update(vision)
    pi_stand_in.shrink(modeling_pi0)  # pi_stand_in.check_shrunk refuses over 1M parameters: the check is here
    with torch.device("meta"):
        model = modeling_pi0.PaliGemmaWithExpertModel(
            modeling_pi0.get_gemma_config("gemma_2b"),
            modeling_pi0.get_gemma_config("gemma_300m"),
            precision="float32",
            image_size=IMAGE_SIZE,
        )
    parameters = sum(p.numel() for p in model.parameters())
    if parameters < min_params:
        raise SystemExit(f"the widened pi0 stand-in has {parameters:,} parameters, fewer than {min_params:,}")
    return parameters


def tensor_bytes(tensor: Any) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(result_dir: Path, args: list[str], widened: Callable[[], int] = widen) -> None:
    """Train with `args` on this rank; write RESULT_DIR/rank<N>.json: save durations, footprint, memory.
    `widened` patches pi0's sizes (`widen` with other sizes, say) and returns its backbone's parameters."""
    import torch

    from accel_train import checkpoint_parts, checkpointer, sharded_checkpoint, sharding
    from accel_train import train as trainer

    backbone = widened()
    saves: list[dict[str, float]] = []
    taken: dict[str, Any] = {}
    save, summarize = checkpointer.Checkpointer.save, trainer.summarize

    parts_of_save: dict[str, float] = {}  # the save in progress, training thread
    background: list[dict[str, float]] = []  # the writer thread's work, one record per call

    timing = threading.local()  # a timed part that calls another (take_shards -> take_optimizer) counts once

    def timed(name: str, function: Any) -> Any:
        """`function`, its time added to parts_of_save[name] on the training thread, recorded in `background`
        on the writer thread."""

        def timed_function(*args: Any, **kwargs: Any) -> Any:
            if getattr(timing, "inside", False):
                return function(*args, **kwargs)
            timing.inside, start = True, time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timing.inside, elapsed = False, time.perf_counter() - start
                if threading.current_thread() is threading.main_thread():
                    parts_of_save[name] = parts_of_save.get(name, 0.0) + elapsed
                else:  # with the process's peak RSS so far: which part of the write reaches it
                    background.append({name: elapsed, "peak_rss": peak_rss()})

        return timed_function

    def timed_save(self: checkpointer.Checkpointer, state: Any, *rest: Any, **named: Any) -> Path:
        parts_of_save.clear()
        taken.setdefault("peak_rss_before_saves", peak_rss())  # training alone, before any checkpoint
        start = time.perf_counter()
        path = save(self, state, *rest, **named)
        saves.append({"step": state.step, "s": time.perf_counter() - start, **parts_of_save})
        return path

    # Where a save's time goes, by the checkpointer's parts that exist in this version of it: waiting for the
    # previous write; copying into the snapshot (DDP: the whole state; FSDP: this rank's shards); gathering
    # sharded state to the main process (torch's full state dicts, or the snapshot's own gather); writing.
    # --checkpoint_format sharded: taking the state dicts (torch's, of the sharded policy and optimizer), copying
    # this process's part, and its writer thread's write of its shard file. In both: the barriers (a rank waiting
    # for the others), the small files (configs, processors, trainer state), and the main process's publishing of
    # the folder (the manifest's sha256 of every file, the rename).
    parts = [
        (checkpointer.Checkpointer, "wait", "wait_s"),
        (checkpoint_parts.TensorCopies, "take", "copy_s"),
        (checkpoint_parts.TensorCopies, "gather", "gather_s"),
        (checkpoint_parts.PolicyWeights, "_write", "write_s"),
        (checkpoint_parts.OptimizerState, "_write", "write_s"),
        (getattr(sharded_checkpoint, "ShardedState", None), "_state", "state_dict_s"),
        (getattr(sharded_checkpoint, "_Staging", None), "stage", "copy_s"),
        (getattr(sharded_checkpoint, "ShardedState", None), "write", "write_s"),
        (checkpointer.Checkpointer, "_finalize", "publish_s"),
        (checkpointer.Accelerator, "wait_for_everyone", "barrier_s"),
        *((getattr(checkpoint_parts, part, None), "save", "small_files_s") for part in SMALL_PARTS),
    ]
    for owner, attribute, name in parts:
        if hasattr(owner, attribute):
            setattr(owner, attribute, timed(name, getattr(owner, attribute)))

    def summarize_and_measure(step: Any, *rest: Any, **named: Any) -> None:
        summarize(step, *rest, **named)
        parts = step.parts
        taken["parts"] = parts
        taken["footprint"] = sharding.footprint(parts.policy, parts.optimizer)  # what the trainer's FSDP line says
        taken["parameters"] = sum(p.numel() for p in parts.policy.parameters())

    checkpointer.Checkpointer.save = timed_save
    trainer.summarize = summarize_and_measure
    trainer.run(args)
    optimizer = taken["parts"].optimizer.optimizer
    optimizer_bytes = sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    f: sharding.Footprint = taken["footprint"]
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "saves": saves,
        "background": background,
        "parameters": taken["parameters"],
        "backbone_parameters": backbone,
        "footprint": {
            "params": f.params,
            "grads": f.grads,
            "optimizer": f.optimizer,
            "local": f.local,
            "total": f.total,
        },  # fmt: skip
        "optimizer_state_measured": optimizer_bytes,  # Adam's exp_avg/exp_avg_sq held on this rank after training
        "peak_rss": peak_rss(),
        "peak_rss_before_saves": taken["peak_rss_before_saves"],
    }
    (result_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))


# --- driver: the runs, alternated, and the report ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(mode: str) -> list[str]:
    if mode == "DDP":  # real 2-process gloo DDP (`accelerate launch --cpu --num_processes 2` starts only one)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes",
            "2", "--main_process_port", str(free_port()), str(SHIM)]  # fmt: skip


def trainer_args(data: Path, out: Path, steps: int, save_freq: int) -> list[str]:
    return [
        "--dataset.repo_id", "local/piper_demo", "--dataset.root", str(data), "--demo_dataset=false",
        "--policy.type", "pi0", f"--policy.image_resolution=[{IMAGE_SIZE},{IMAGE_SIZE}]", "--batch_size", str(BATCH),
        "--val_episodes", "0", "--log_freq", "1", "--save_freq", str(save_freq), "--steps", str(steps),
        "--output_dir", str(out), "--num_workers", "0",
    ]  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """What another benchmark changes in `one_run`: the worker script (`SCRIPT --worker RESULT_DIR TRAINER_ARGS`),
    trainer options added after these runs' own (draccus takes the last of a repeated option), and whether the run's
    output folder (the result's "out") is kept for the caller to measure and delete."""

    script: Path = Path(__file__)
    extra: tuple[str, ...] = ()
    keep: bool = False


def one_run(
    mode: str, name: str, tmp: Path, env: dict[str, str], args: argparse.Namespace, variant: Variant = Variant()
) -> dict:
    """One training run of `mode` in TMP/NAME, on the dataset in TMP/piper_demo: what it measured."""
    out, results, steps = tmp / name, tmp / f"{name}-results", args.steps
    results.mkdir()
    command = [*launcher(mode), str(variant.script.resolve()), "--worker", str(results),
               *trainer_args(tmp / "piper_demo", out, steps, args.save_freq), *variant.extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - started
    (args.logs / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        log = (done.stdout + done.stderr)[-6000:]
        raise SystemExit(f"{name} failed ({done.returncode}): {' '.join(command)}\n{log}")
    ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    if len(ranks) != 2:
        raise SystemExit(f"{name}: {len(ranks)} ranks wrote results, not 2\n{done.stderr[-4000:]}")
    log = done.stdout + done.stderr
    fsdp_lines = [line for line in log.splitlines() if "FSDP:" in line and "this process holds" in line]
    if (mode == "FSDP") != bool(fsdp_lines):  # a silent fallback to DDP (or FSDP where DDP was meant) fails the run
        raise SystemExit(f"{name}: the trainer's FSDP start-up line is {'missing' if mode == 'FSDP' else 'there'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "samples_per_s" in r]
    steady = [r for r in records if r["step"] > 1]  # step 1 warms up (first pass, lazy inits)
    main = next(r for r in ranks if r["rank"] == 0)
    steady_saves = [s for s in main["saves"] if s["step"] < steps]  # the last is followed by the end-of-run wait
    blocked = [s["s"] for s in steady_saves]
    # Training steps only (the trainer's window restarts after a save), and end to end over steps 2..N with the saves.
    rate = len(steady) / sum(1 / r["samples_per_s"] for r in steady)
    span = records[-1]["time"] - records[0]["time"]
    with_saves = (records[-1]["samples_seen"] - records[0]["samples_seen"]) / span
    if not variant.keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)  # ~1.5 GB a checkpoint
    return {
        "mode": mode, "name": name, "out": str(out), "wall_s": wall, "blocked": blocked, "steady_saves": steady_saves,
        "all_saves": main["saves"], "samples_per_s": rate, "with_saves": with_saves, "ranks": ranks,
        "losses": [r["loss"] for r in records],
    }  # fmt: skip


@contextmanager
def tokenizer_hub(tmp: Path) -> Iterator[dict[str, str]]:
    """The environment of the runs: the stand-in PaliGemma tokenizer served by a local test Hub under the repo id
    pi0 loads it from (as tests/test_pi.py's pi_tokenizers), 1 thread per process."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test Hub speaks git-LFS, not Xet
    import stand_ins
    from hub_server import HubServer
    from huggingface_hub import HfApi

    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo(stand_ins.PALIGEMMA)
        api.upload_folder(repo_id=stand_ins.PALIGEMMA, folder_path=stand_ins.paligemma_tokenizer(tmp / "paligemma"))
        yield {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp / "home"),
               "OMP_NUM_THREADS": "1"}  # fmt: skip


def size(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def verdict(ratio: float, limit: float) -> str:
    return "meets" if ratio <= limit else "**misses**"


def mean(values: Any) -> float:
    values = list(values)
    return statistics.mean(values) if values else float("nan")


def memory(by: dict[str, list[dict]]) -> tuple[list[tuple[str, ...]], str]:
    """The report's rows on memory, and its reading of them."""
    # Per process: the larger rank (FSDP's shards can be uneven); the same in every run of a mode.
    local = {m: max(k["footprint"]["local"] for r in by[m] for k in r["ranks"]) for m in MODES}
    total = {m: max(k["footprint"]["total"] for r in by[m] for k in r["ranks"]) for m in MODES}
    adam = {m: max(k["optimizer_state_measured"] for r in by[m] for k in r["ranks"]) for m in MODES}
    rss = {(m, rank, key): max(k[key] for r in by[m] for k in r["ranks"] if k["rank"] == rank) for m in MODES
           for rank in (0, 1) for key in ("peak_rss", "peak_rss_before_saves")}  # fmt: skip
    f = {m: by[m][0]["ranks"][0]["footprint"] for m in MODES}
    bytes_ratio = local["FSDP"] / local["DDP"]
    key0 = "peak_rss_before_saves"
    added = {m: rss[m, 0, "peak_rss"] - rss[m, 0, key0] for m in MODES}
    # The main process's peak after each save's background work (the write is its last part), per run.
    after_saves = {
        m: [[b["peak_rss"] for b in k["background"] if "write_s" in b] for r in by[m] for k in r["ranks"]
            if k["rank"] == 0]
        for m in MODES
    }  # fmt: skip
    # From the second save on: the first allocates the snapshot's buffers.
    growth = {m: mean((p[-1] - p[1]) / (len(p) - 2) for p in after_saves[m] if len(p) > 2) for m in MODES}

    def series(mode: str) -> str:
        return "; ".join(", ".join(f"{b / 1e9:.2f}" for b in peaks) for peaks in after_saves[mode])

    # A checkpoint's tensors: the weights and the AdamW state (as DDP's process holds it whole).
    state_bytes = f["DDP"]["params"][1] + adam["DDP"]
    rows = [
        ("per process: parameters + gradients + optimizer state (`sharding.footprint`, the trainer's FSDP line)",
         "FSDP <= 0.55x DDP", f"{size(local['DDP'])} of {size(total['DDP'])}",
         f"{size(local['FSDP'])} of {size(total['FSDP'])}", f"**{bytes_ratio:.2f}x**, {verdict(bytes_ratio, 0.55)}"),
        ("of which parameters / gradients / optimizer state", "",
         " / ".join(size(f["DDP"][k][0]) for k in ("params", "grads", "optimizer")),
         " / ".join(size(f["FSDP"][k][0]) for k in ("params", "grads", "optimizer")), ""),
        ("AdamW state held after training, measured (its tensors on this process, larger rank)", "",
         size(adam["DDP"]), size(adam["FSDP"]), f"{adam['FSDP'] / adam['DDP']:.2f}x"),
        *(
            (label, "", f"{size(rss['DDP', 0, key])} / {size(rss['DDP', 1, key])}",
             f"{size(rss['FSDP', 0, key])} / {size(rss['FSDP', 1, key])}",
             f"{rss['FSDP', 0, key] / rss['DDP', 0, key]:.2f}x / {rss['FSDP', 1, key] / rss['DDP', 1, key]:.2f}x")
            for label, key in (
                ("peak RSS of the whole process before the first save (training alone), main / other",
                 "peak_rss_before_saves"),
                ("peak RSS of the whole process over the run (with the checkpoints' copies), main / other",
                 "peak_rss"),
            )
        ),
    ]  # fmt: skip
    text = f"""- Memory: each FSDP process holds {bytes_ratio:.2f}x of DDP's parameters + gradients + optimizer state, so the
  target of at most 0.55x is {"met" if bytes_ratio <= 0.55 else "missed"}; AdamW's tensors measured after training
  agree ({adam["FSDP"] / adam["DDP"]:.2f}x; fewer bytes than the footprint counts, since AdamW keeps state only for
  the parameters that got a gradient). The footprint leaves out activations and the full copy a checkpoint
  gathers on the main process: in this CPU-only run the main process's peak RSS is
  {rss["FSDP", 0, "peak_rss"] / rss["DDP", 0, "peak_rss"]:.2f}x DDP's, the other process's
  {rss["FSDP", 1, "peak_rss"] / rss["DDP", 1, "peak_rss"]:.2f}x; before the first save (training alone),
  {rss["FSDP", 0, key0] / rss["DDP", 0, key0]:.2f}x and {rss["FSDP", 1, key0] / rss["DDP", 1, key0]:.2f}x. The
  checkpoints raise the main process's peak by {size(added["DDP"])} under DDP and {size(added["FSDP"])} under FSDP
  (a checkpoint's weights and AdamW state: {size(state_bytes)}). (On GPUs those copies are in host memory, not on the GPU.)
  The main process's peak RSS after each save's background work, in GB, run by run: DDP {series("DDP")};
  FSDP {series("FSDP")}. From the second save to the last it grows by {size(growth["DDP"])} per save under DDP
  and {size(growth["FSDP"])} under FSDP."""  # noqa: E501
    return rows, text


def report(args: argparse.Namespace, runs: list[dict], started: float, wall: float) -> str:
    from compare import machine

    by = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}

    def per_pair(key: Any) -> str:
        """FSDP / DDP of `key(run)` in each pair of runs."""
        ratios = [key(f) / key(d) for d, f in zip(by["DDP"], by["FSDP"], strict=True)]
        return ", ".join(f"{ratio:.2f}" for ratio in ratios)

    blocked = {m: mean(s for r in by[m] for s in r["blocked"]) for m in MODES}
    # The snapshot allocates its CPU buffers, reused from then on, at the first save.
    later = {m: mean(s for r in by[m] for s in r["blocked"][1:]) for m in MODES}
    rate = {m: mean(r["samples_per_s"] for r in by[m]) for m in MODES}
    with_saves = {m: mean(r["with_saves"] for r in by[m]) for m in MODES}
    parameters = runs[0]["ranks"][0]["parameters"]
    block_ratio = blocked["FSDP"] / blocked["DDP"]
    memory_rows, memory_text = memory(by)
    reference = by["DDP"][0]["losses"]
    loss_gap = max(abs(a - b) / abs(b) for r in runs for a, b in zip(r["losses"], reference, strict=True))
    same = (
        "equal the first DDP run's" if loss_gap == 0 else f"match the first DDP run's within {loss_gap:.1e} (relative)"
    )

    def part(mode: str, key: str) -> float:
        """Mean seconds per save (before the last) in `key` on the training thread of the main process."""
        return mean(s.get(key, 0.0) for r in by[mode] for s in r["steady_saves"])

    def behind(mode: str, key: str) -> float:
        """Mean seconds per save in `key` on the main process's writer thread (every save of every run)."""
        records = [b for r in by[mode] for k in r["ranks"] if k["rank"] == 0 for b in k["background"]]
        return mean(b[key] for b in records if key in b) if any(key in b for b in records) else 0.0

    def breakdown(mode: str) -> str:
        wait, copy, gather = (part(mode, k) for k in ("wait_s", "copy_s", "gather_s"))
        gathered = f", gathering {gather:.2f} s" if gather else ""
        rest = blocked[mode] - wait - copy - gather
        return (f"waiting for the previous write {wait:.2f} s, copying into the snapshot {copy:.2f} s{gathered}, "
                f"the rest (small files, barriers) {rest:.2f} s")  # fmt: skip

    def in_background(mode: str) -> str:
        gather, write = behind(mode, "gather_s"), behind(mode, "write_s")
        return (f"gathering {gather:.2f} s, " if gather else "") + f"writing the tensors {write:.2f} s"

    foreground_gather = part("FSDP", "gather_s") > 0.05 * blocked["FSDP"]
    fsdp_save = (
        "every rank takes part in gathering them to the main process before the save returns"
        if foreground_gather
        else "each rank copies only its own shards into reused CPU buffers, and the writer threads gather them to "
        "the main process in the background"
    )
    waits = {m: part(m, "wait_s") for m in MODES}
    if max(waits.values()) < 0.05:
        waited = f"Neither mode waited for the previous write: it was done within {args.save_freq} steps."
    else:
        waited = (
            f"Waiting for the previous write (the background work not done within {args.save_freq} steps) took "
            f"{waits['DDP']:.2f} s under DDP and {waits['FSDP']:.2f} s under FSDP."
        )

    run_rows = "\n".join(
        f"| {i + 1} | {r['mode']} | {', '.join(f'{s["s"]:.2f}' for s in r['all_saves'])} | "
        f"{mean(r['blocked']):.2f} | {r['samples_per_s']:.3f} | {r['with_saves']:.3f} | {r['wall_s']:.0f} |"
        for i, r in enumerate(runs)
    )
    gemma, expert, vision = WIDE["gemma_2b"], WIDE["gemma_300m"], WIDE_VISION
    command = f"python benchmarks/fsdp.py --reps {args.reps} --steps {args.steps} --save_freq {args.save_freq}"
    date = time.strftime("%Y-%m-%d", time.gmtime(started))
    rows = [
        (f"training blocked per checkpoint (`Checkpointer.save` on the main process; mean of the "
         f"{len(runs[0]['blocked'])} saves before the last, x {args.reps} runs)", "FSDP <= 2x DDP",
         f"{blocked['DDP']:.2f} s", f"{blocked['FSDP']:.2f} s",
         f"**{block_ratio:.2f}x**, {verdict(block_ratio, 2.0)} (pairs: {per_pair(lambda r: mean(r['blocked']))})"),
        ("the same without each run's first save (where the snapshot allocates its reused CPU buffers)", "",
         f"{later['DDP']:.2f} s", f"{later['FSDP']:.2f} s", f"{later['FSDP'] / later['DDP']:.2f}x"),
        ("of which (training thread)", "", breakdown("DDP"), breakdown("FSDP"), ""),
        ("in the background per save (writer thread of the main process; not blocking unless the next save comes "
         "first)", "", in_background("DDP"), in_background("FSDP"), ""),
        (f"samples/s of the training steps (metrics.jsonl `samples_per_s`, steps 2-{args.steps}, saves excluded)", "",
         f"{rate['DDP']:.3f}", f"{rate['FSDP']:.3f}",
         f"{rate['FSDP'] / rate['DDP']:.2f}x (pairs: {per_pair(lambda r: r['samples_per_s'])})"),
        (f"samples/s over steps 2-{args.steps} with the checkpoint stalls", "", f"{with_saves['DDP']:.3f}",
         f"{with_saves['FSDP']:.3f}", f"{with_saves['FSDP'] / with_saves['DDP']:.2f}x"),
        *memory_rows,
    ]  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return f"""# FSDP2 vs DDP benchmark (CPU, 2 processes)

Written by `{command}` on {date} ({wall / 60:.1f} min).
Machine: {machine()}.

Workload: lerobot's pi0 widened to **{parameters / 1e6:.1f}M parameters**, all trainable, float32, random
weights: tests/pi_stand_in.py's patch with the sizes of `WIDE` in benchmarks/fsdp.py (PaliGemma's Gemma
{gemma["width"]} wide x {gemma["depth"]} layers, MLP {gemma["mlp_dim"]}; action expert {expert["width"]} x \
{expert["depth"]}, MLP {expert["mlp_dim"]}; both 8 heads of {gemma["head_dim"]}, 1 KV head; SigLIP \
{vision["hidden_size"]} x {vision["num_hidden_layers"]}), cameras resized to {IMAGE_SIZE}x{IMAGE_SIZE}.
The demo dataset (2 episodes), batch {BATCH} per process, {args.steps} steps, a checkpoint every \
{args.save_freq} steps (asynchronous, the default), 1 thread per process.
DDP: `torchrun --nproc_per_node 2` (gloo). FSDP: `accelerate launch --config_file configs/accelerate/fsdp.yaml
--num_processes 2` through tests/fsdp_on_cpu.py (FSDP2, reshard after forward, FULL_STATE_DICT checkpoints).
{args.reps} runs of each, in the order {", ".join(r["mode"] for r in runs)}: the order swaps every pair, so drift
and the machine's other load hit both.

| measure | target | DDP | FSDP | FSDP / DDP |
|---|---|---|---|---|
{table}

Each run (seconds; the last save, at step {args.steps}, is followed by the end-of-run wait and left out of the
means):

| # | mode | every save blocked (s) | mean before the last (s) | samples/s, steps | samples/s, with saves | run wall (s) |
|---|---|---|---|---|---|---|
{run_rows}

Reading.

- Checkpoint stall: FSDP blocks training {block_ratio:.1f}x as long as DDP per save ({blocked["FSDP"]:.2f} s vs
  {blocked["DDP"]:.2f} s), so the target of at most 2x is {"met" if block_ratio <= 2 else "missed"}. Under DDP a save
  copies the weights and AdamW state, which each process has whole, into CPU buffers reused from save to save;
  under FSDP {fsdp_save}. {waited}
- Throughput: FSDP trains at {rate["FSDP"] / rate["DDP"]:.2f}x DDP's samples/s. FSDP2 all-gathers each unit's
  weights before its forward and again before its backward and reduce-scatters the gradients; DDP all-reduces
  the gradients once. Here that traffic goes over gloo on the same 2 cores that compute, so this says little
  about NCCL on GPUs.
{memory_text}
- Same training: every run's per-step losses {same}.
- Noise: the CPU is shared, so single runs vary (see the pairs and the table above); the ratios come from runs
  alternated in this one command, not from separate sessions.
"""  # noqa: E501


def run_all(args: argparse.Namespace, runs_in: Callable[..., Iterator[dict]], report: Callable[..., str]) -> None:
    """The runs `runs_in(tmp, env)` yields, in a scratch folder TMP holding the demo dataset (TMP/piper_demo), with
    the environment of `tokenizer_hub`; their records kept in args.logs/runs.json (args.logs: TMP unless given);
    `report(args, runs, started, wall)` written to args.out and printed."""
    from accel_train import demo_dataset

    started, clock = time.time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        args.logs = args.logs or tmp
        args.logs.mkdir(parents=True, exist_ok=True)
        demo_dataset.create(tmp / "piper_demo", episodes=2, seed=0)
        with tokenizer_hub(tmp) as env:
            runs = list(runs_in(tmp, env))
        (args.logs / "runs.json").write_text(json.dumps(runs, indent=1))
    text = report(args, runs, started, time.perf_counter() - clock)
    args.out.write_text(text)
    print(text)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save_freq", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_fsdp.md")
    parser.add_argument("--logs", type=Path, help="keep each run's output here (default: discarded)")
    args = parser.parse_args()

    def runs_in(tmp: Path, env: dict[str, str]) -> Iterator[dict]:
        for rep in range(args.reps):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                run = one_run(mode, f"{mode.lower()}-{rep}", tmp, env, args)
                print(
                    f"{run['name']}: blocked {[round(s, 2) for s in run['blocked']]} s, "
                    f"{run['samples_per_s']:.3f} samples/s, footprint "
                    f"{size(max(k['footprint']['local'] for k in run['ranks']))}, wall {run['wall_s']:.0f} s",
                    flush=True,
                )
                yield run

    run_all(args, runs_in, report)


if __name__ == "__main__":
    main()
