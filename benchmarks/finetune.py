"""Fine-tuning a pretrained SmolVLA (the tiny offline stand-in of tests/stand_ins.py) from the same --policy.path:
accel-train vs lerobot-train samples/s, and a LoRA fine-tune's checkpoints vs a full fine-tune's (size, and the
time training is blocked per save), measured side by side in one run. Writes docs/benchmarks_finetune.md.

    python benchmarks/finetune.py [--pairs 2] [--steps 60] [--out docs/benchmarks_finetune.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from compare import BATCH, BIN, LEROBOT_STEP, LOG_FREQ, OUR_STEP, alternated, machine, run  # noqa: E402

SAVE_FREQ = 10


def ours(data: Path, policy: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "accel_train" / "train.py"), "--dataset_id", "local/piper_demo",
        "--dataset_root", str(data), f"--policy.path={policy}", "--output_dir", str(out), "--steps", str(steps),
        "--log_freq", str(LOG_FREQ), "--batch_size", str(BATCH), "--num_workers", "1", "--seed", "1000", *extra,
    ]  # fmt: skip


def lerobot(data: Path, policy: Path, out: Path, steps: int) -> list[str]:
    return [
        str(BIN / "lerobot-train"), "--dataset.repo_id=local/piper_demo", f"--dataset.root={data}",
        "--dataset.video_backend=pyav", f"--policy.path={policy}", "--policy.device=cpu", "--policy.push_to_hub=false",
        f"--batch_size={BATCH}", "--num_workers=1", f"--steps={steps}", f"--log_freq={LOG_FREQ}",
        "--save_checkpoint=false", "--seed=1000", "--wandb.enable=false", f"--output_dir={out}",
    ]  # fmt: skip


def timed_saves(args: list[str]) -> None:
    """In a child process: train with `args`, timing how long each Checkpointer.save blocks training."""
    from accel_train import checkpointer
    from accel_train.train import run as train_run

    durations, save = [], checkpointer.Checkpointer.save

    def timed(self, state):
        start = time.perf_counter()
        path = save(self, state)
        durations.append(time.perf_counter() - start)
        return path

    checkpointer.Checkpointer.save = timed
    train_run(args)
    print(json.dumps({"blocked_s": statistics.mean(durations[:-1])}))  # the last save is followed by the end


def saves(data: Path, policy: Path, out: Path, *extra: str) -> tuple[float, int]:
    """Mean seconds a save blocks training, and the checkpoint's size in bytes."""
    args = ours(data, policy, out, 4 * SAVE_FREQ, "--save_freq", str(SAVE_FREQ), *extra)[2:]
    result = subprocess.run([sys.executable, __file__, "--timed-saves", *args], cwd=REPO, capture_output=True,
                            text=True, check=True)  # fmt: skip
    size = sum(p.stat().st_size for p in (out / f"checkpoint-{SAVE_FREQ}").iterdir())
    return json.loads(result.stdout.splitlines()[-1])["blocked_s"], size


def main() -> None:
    if sys.argv[1:2] == ["--timed-saves"]:
        return timed_saves(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_finetune.md")
    args = parser.parse_args()
    import stand_ins

    from accel_train import demo_dataset

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        data = demo_dataset.create(tmp / "piper_demo", episodes=10, seed=0)
        policy = stand_ins.smolvla_policy(tmp / "smolvla", stand_ins.smolvlm(tmp / "vlm"))

        def rate(name: str, pair: int) -> float:
            out = tmp / f"{name}-{pair}"
            if name == "ours":
                command, pattern = ours(data, policy, out, args.steps, "--save_freq", str(10**6)), OUR_STEP
            else:
                command, pattern = lerobot(data, policy, out, args.steps), LEROBOT_STEP
            return run(command, pattern).samples_per_s(BATCH)

        rates = alternated(args.pairs, ("ours", "lerobot"), rate)
        full = saves(data, policy, tmp / "full")
        lora = saves(data, policy, tmp / "lora", "--peft.method_type=LORA", "--peft.r=16")
    ratio = statistics.mean(rates["ours"]) / statistics.mean(rates["lerobot"])
    pairs = ", ".join(f"{o / t:.2f}" for o, t in zip(rates["ours"], rates["lerobot"], strict=True))
    text = f"""# Fine-tuning benchmark

Written by `python benchmarks/finetune.py --pairs {args.pairs} --steps {args.steps}` on
{time.strftime("%Y-%m-%d", time.gmtime(started))} ({(time.time() - started) / 60:.0f} min). Machine: {machine()}.
Workload: the tiny SmolVLA stand-in (tests/stand_ins.py: a SmolVLM-architecture VLM with random weights, ~0.24M
parameters) fine-tuned from the same `--policy.path` on the demo dataset (10 episodes, 3 AV1 cameras at 64x64),
batch {BATCH}, 1 loader worker, {args.steps} steps; runs alternated in this one command.

| measure | target | measured |
|---|---|---|
| samples/s, accel-train / lerobot-train 0.6.1 | >= 1.0x | **{ratio:.2f}x** ({statistics.mean(rates["ours"]):.1f} vs {statistics.mean(rates["lerobot"]):.1f}; pairs: {pairs}) |
| checkpoint size, LoRA (r=16, SmolVLA's default targets) / full fine-tune | | **{lora[1] / full[1]:.1%}** ({lora[1] / 1e3:.0f} KB vs {full[1] / 1e3:.0f} KB) |
| training blocked per save, LoRA / full fine-tune | | **{lora[0] / full[0]:.2f}x** ({lora[0] * 1e3:.0f} ms vs {full[0] * 1e3:.0f} ms) |

The stand-in is tiny, so the whole checkpoint is small either way; with lerobot/smolvla_base (450M parameters) a
full checkpoint holds ~1.8 GB of weights and ~3.6 GB of Adam state, a LoRA one the adapters only.
"""  # noqa: E501
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
