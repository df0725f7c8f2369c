"""Shared fixtures: a tiny demo dataset, a tiny ACT, and helpers to run the trainer as users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import HubServer, publish_dataset

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


def free_port(low: int = 0, high: int = 0) -> int:
    """A port nobody listens on now (any, or the first free one from `low` up to `high`)."""
    for port in range(low, high) if low else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}-{high}")


def two_node_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of launch/slurm_multi_node.sbatch in a 2-node allocation of 1 process each, on this
    machine: stand-ins for srun (the per-node command twice, SLURM_NODEID 0 and 1, concurrently) and scontrol
    (this host; requeue does nothing), and a job id whose rendezvous port (20000 + id) is free."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nshift\nfor node in 0 1; do SLURM_NODEID=$node "$@" & done\n'
        'status=0\nfor job in $(jobs -p); do wait "$job" || status=$?; done\nexit $status\n'
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1" = show ] && echo 127.0.0.1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    job_id = free_port(21000, 40000) - 20000
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NODELIST": "n[0-1]", "OMP_NUM_THREADS": "1"}  # fmt: skip


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


@dataclass(frozen=True)
class ServedDataset:
    """A dataset repo on a local test Hub; `env` is the environment of a process that downloads from it."""

    hub: HubServer
    repo_id: str
    revision: str  # the commit tagged with the dataset's codebase_version
    root: Path  # the local copy that was pushed
    env: dict[str, str]


@pytest.fixture
def served_dataset(tiny_dataset: Path, tmp_path: Path) -> Iterator[ServedDataset]:
    """The tiny demo dataset published on a fresh test Hub (tests/hub_server.py) as lerobot's `push_to_hub` does
    (without its dataset card, whose YAML huggingface_hub validates on huggingface.co): dataset repo
    `test-user/piper_demo`, its files at the repo root as on disk (meta/, data/, videos/), in one commit tagged
    with meta/info.json's codebase_version (`v3.0`), the tag lerobot opens a Hub dataset at.

    For the test's duration this process's huggingface_hub client talks to that Hub, logged in, with its cache in
    tmp_path/home; `env` does the same for subprocesses (HF_LEROBOT_HOME is tmp_path/home/lerobot there).
    """
    import huggingface_hub

    home = tmp_path / "home"
    with HubServer() as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setenv("HF_TOKEN", hub.token)
        repo_id = f"{hub.user}/piper_demo"
        commit = publish_dataset(huggingface_hub.HfApi(), repo_id, tiny_dataset)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(home)}
        env["HF_LEROBOT_HOME"] = str(home / "lerobot")
        yield ServedDataset(hub, repo_id, commit, tiny_dataset, env)
