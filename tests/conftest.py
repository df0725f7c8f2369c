"""Shared fixtures: a tiny demo dataset, a tiny ACT, and helpers to run the trainer as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may reach the real Hub: huggingface_hub reads these at import time. Port 9 on the loopback refuses
# connections at once; the Hub tests point HF_ENDPOINT at their own local server.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("SVT_LOG", "1")

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "accel_train" / "train.py"
# A tiny ACT (the demo's), trained on 2 episodes x 40 frames: 10 optimizer steps per epoch at batch 8.
EPISODES = 2
FRAMES = 40
BATCH = 8


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from accel_train import demo_dataset

    return demo_dataset.create(tmp_path_factory.mktemp("data") / "piper_demo", episodes=EPISODES, seed=0)


def base_args(dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--dataset_root", str(dataset),
        "--demo_dataset=false",
        "--output_dir", str(output_dir),
        "--batch_size", str(BATCH),
        "--log_freq", "1",
        "--num_workers", "0",
        "--val_episodes", "0",  # the demo config holds out episodes; these tests train on both
        *extra,
    ]  # fmt: skip


def run_cli(
    args: list[str], launcher: list[str] | None = None, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python accel_train/train.py ARGS` (or under another launcher) the way a user types it."""
    command = [*(launcher or [sys.executable]), str(TRAIN), *args]
    environment = os.environ.copy() if env is None else env
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)


def losses(output_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]  # not validation records or resume points


@pytest.fixture(scope="session")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run through the Python API, with a checkpoint at step 3."""
    from accel_train.train import train

    out = tmp_path_factory.mktemp("trained")
    state = train(
        config=str(REPO / "configs" / "demo.yaml"),
        output_dir=str(out),
        dataset_id="local/piper_demo",
        dataset_root=str(tiny_dataset),
        demo_dataset=False,
        steps=3,
        save_freq=3,
        batch_size=8,
        num_workers=0,
        val_episodes=0,
        policy={"type": "act", "dim_model": 64},  # nested options work as keyword arguments too
    )
    assert state.step == 3
    return out


STRAIGHT_STEPS = 16


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def straight(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run: 16 steps of the tiny ACT with image augmentation on."""
    out = tmp_path_factory.mktemp("straight")
    assert_ok(run_cli(base_args(tiny_dataset, out, "--steps", str(STRAIGHT_STEPS), "--image_transforms.enable=true")))
    return out


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ours, theirs = load_file(a), load_file(b)
    return ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
