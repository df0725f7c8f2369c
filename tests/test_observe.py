"""Seeing what training does: TensorBoard/wandb curves across a resume, validation, plot, listing, export."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ok, base_args, run_cli
from safetensors.torch import load_file

from accel_train import demo_dataset
from accel_train.cli import main as cli

LOG_FREQ, SAVE_FREQ, STEPS = 4, 12, 24


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset (10 episodes, 2 held out), TensorBoard on; the run dies after logging step 24 but before
    its checkpoint survives, and is resumed from checkpoint-12 with `latest`."""
    tmp = tmp_path_factory.mktemp("observed")
    dataset = demo_dataset.create(tmp / "demo", seed=0)
    out = tmp / "out"
    args = base_args(dataset, out, "--steps", str(STEPS), "--save_freq", str(SAVE_FREQ), "--log_freq", str(LOG_FREQ))
    args += ["--val_episodes", "0.2", "--log_with", "tensorboard"]
    assert_ok(run_cli(args))
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    resumed = run_cli(args + ["--resume_from_checkpoint", "latest"])
    assert_ok(resumed)
    assert "Held-out action error" in resumed.stderr
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_continue_across_the_resume_without_duplicates(observed: Path) -> None:
    rows = records(observed)
    assert [r["step"] for r in rows if "loss" in r] == list(range(LOG_FREQ, STEPS + 1, LOG_FREQ))
    assert [r["step"] for r in rows if "val_loss" in r] == [SAVE_FREQ, STEPS]
    assert [(r["step"], r["resumed_from"]) for r in rows if "resumed_from" in r] == [(SAVE_FREQ, "checkpoint-12")]


def test_validation_beats_predicting_the_mean(observed: Path) -> None:
    (final,) = [r for r in records(observed) if "val_action_error" in r]
    assert final["step"] == STEPS
    # 24 steps of the tiny ACT already predict held-out actions much better than their mean does.
    assert final["val_action_error"] < 0.75 * final["baseline_action_error"], final


def test_tensorboard_shows_each_step_once_with_the_resumed_values(observed: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(observed / "tensorboard"))
    events.Reload()
    rows = records(observed)
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in loss] == list(range(LOG_FREQ, STEPS + 1, LOG_FREQ))
    expected = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert all(value == pytest.approx(expected[step], rel=1e-6) for step, value in loss)
    assert [e.step for e in events.Scalars("val_loss")] == [SAVE_FREQ, STEPS]


def test_plot_writes_the_curves(observed: Path, capsys) -> None:
    assert cli(["plot", str(observed)]) == 0
    png = observed / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert cli(["plot", str(observed / "missing")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_checkpoints_lists_and_verifies(observed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(observed, out)
    assert cli(["checkpoints", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["verified"], r["pushed"]) for r in rows] == [(12, "yes", "-"), (24, "yes", "-")]
    assert all(r["size"] > 1_000_000 and 0 <= r["age_s"] < 3600 for r in rows)
    with open(out / "checkpoint-12" / "policy.safetensors", "r+b") as file:
        file.write(b"\x00")
    assert cli(["checkpoints", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["step", "checkpoint", "size", "verified", "pushed", "age"]
    assert "NO: policy.safetensors" in table[1] and " yes " in table[2]
    assert cli(["export", str(out / "checkpoint-12"), str(tmp_path / "bad")]) == 1
    assert "Cannot export" in capsys.readouterr().err and not (tmp_path / "bad" / "model.safetensors").exists()


def test_export_is_a_lerobot_pretrained_folder(observed: Path, tmp_path: Path) -> None:
    """Loaded with lerobot's own APIs, in a fresh process, offline: the deployment path."""
    dest = tmp_path / "exported"
    assert cli(["export", str(observed / f"checkpoint-{STEPS}"), str(dest)]) == 0
    assert not (dest / "optimizer_state.pth").exists()
    code = f"""
import torch
from lerobot.policies.act.modeling_act import ACTPolicy
from lerobot.policies.factory import make_pre_post_processors
from safetensors.torch import load_file
policy = ACTPolicy.from_pretrained({str(dest)!r})
pre, post = make_pre_post_processors(policy.config, pretrained_path={str(dest)!r})
saved = load_file({str(observed / f"checkpoint-{STEPS}" / "policy.safetensors")!r})
assert all(torch.equal(policy.state_dict()[k], v) for k, v in saved.items())
print(type(pre).__name__, len(pre.steps), len(post.steps))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_ok(result)
    assert result.stdout.strip().endswith("ProcessorPipeline 4 2")  # ACT: 4 pre-processing steps, 2 post
    exported, checkpoint = load_file(dest / "model.safetensors"), load_file(observed / "policy.safetensors")
    assert all(torch.equal(exported[k], checkpoint[k]) for k in checkpoint)  # the final model is the same export


def test_wandb_offline_resumes_the_same_run(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--log_with", "wandb")
    for steps in ("2", "4"):
        command = [sys.executable, str(REPO / "accel_train" / "train.py"), *args, "--steps", steps]
        result = subprocess.run(command + ["--resume_from_checkpoint", "latest"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert_ok(result)
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)
