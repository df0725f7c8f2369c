"""What a checkpoint and the final output hold, and that every documented launcher runs the same script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_args, run_cli
from safetensors.torch import load_file

from accel_train import checkpoint as ckpt
from accel_train.train import main

SPEC_FILES = ("policy.safetensors", "preprocessor_config.json", "postprocessor_config.json", "optimizer_state.pth")


def test_checkpoint_layout(trained: Path) -> None:
    folder = trained / "checkpoint-3"
    for name in (*SPEC_FILES, "config.json", "train_config.json", "trainer_state.json", "manifest.json"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in load_file(folder / "policy.safetensors"))
    optimizer = torch.load(folder / "optimizer_state.pth", weights_only=True)
    assert optimizer["state"] and optimizer["param_groups"]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "sample": 24} and state["policy_type"] == "act"
    assert ckpt.verify(folder) is None
    assert not list(trained.glob(".tmp-*"))


def test_final_model_loads_with_lerobot_apis(trained: Path) -> None:
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.act.modeling_act import ACTPolicy

    policy = ACTPolicy.from_pretrained(trained)  # config.json + model.safetensors
    preprocessor, postprocessor = make_pre_post_processors(PreTrainedConfig.from_pretrained(trained), str(trained))
    by_spec_name = make_pre_post_processors(
        policy.config,
        str(trained),
        preprocessor_config_filename="preprocessor_config.json",
        postprocessor_config_filename="postprocessor_config.json",
    )
    assert len(by_spec_name[0].steps) == len(preprocessor.steps)
    for name in SPEC_FILES[:3]:
        assert (trained / name).is_file()
    final, last = load_file(trained / "policy.safetensors"), load_file(trained / "checkpoint-3" / "policy.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    # The exported policy predicts an action chunk from a raw observation, as deployed with lerobot.
    frame = {
        "observation.state": torch.zeros(7),
        **{f"observation.images.{c}": torch.rand(3, 64, 64) for c in ("front", "right", "gripper")},
    }
    policy.eval()
    action = postprocessor(policy.select_action(preprocessor(frame)))
    assert action.shape == (1, 7)


def test_processors_missing_fall_back_to_dataset_stats(
    trained: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    folder = Path(shutil.copytree(trained / "checkpoint-3", out / "checkpoint-3"))
    for path in [*folder.glob("p*processor*"), folder / "manifest.json"]:
        path.unlink()
    args = base_args(tiny_dataset, out, "--steps", "4", "--resume_from_checkpoint", str(folder))
    assert main(args) == 0
    assert "has no preprocessor_config.json or postprocessor_config.json: rebuilding" in capsys.readouterr().err
    assert (out / "checkpoint-4" / "preprocessor_config.json").is_file()


def test_init_from_fine_tunes_from_step_zero(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "finetune"
    assert main(base_args(tiny_dataset, out, "--steps", "2", "--init_from", str(trained / "checkpoint-3"))) == 0
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    # Fresh optimizer: its step counter restarted instead of continuing from 3.
    optimizer = torch.load(out / "checkpoint-2" / "optimizer_state.pth", weights_only=True)
    assert all(float(s["step"]) == 2 for s in optimizer["state"].values())


def test_latest_on_a_finished_run_is_a_no_op(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """Re-running the same `latest` command after the run completed (a requeue) does nothing, successfully."""
    out = Path(shutil.copytree(trained, tmp_path / "done"))
    assert main(base_args(tiny_dataset, out, "--steps", "3", "--resume_from_checkpoint", "latest")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


def test_console_script_help() -> None:
    script = shutil.which("accel-train") or str(Path(sys.executable).parent / "accel-train")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--resume_from_checkpoint" in result.stdout and "--policy.dim_model" in result.stdout


def test_accelerate_launch(tiny_dataset: Path, tmp_path: Path) -> None:
    """`accelerate launch` (torchrun is the launcher of the multi-process tests in test_scale.py)."""
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    result = run_cli(base_args(tiny_dataset, out, "--steps", "2", "--save_freq", "2", "--batch_size", "4"), launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Effective batch 4 = 4 per device x 1 processes" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1 and state["samples_seen"] == 2 * 4
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert ckpt.verify(out / "checkpoint-2") is None
    assert "WARNING" not in result.stderr and "Traceback" not in result.stderr  # e.g. lerobot's device guess


def test_resume_from_a_four_file_checkpoint_of_the_spec(trained: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """A checkpoint holding only the spec's files (another tool's): policy config from the command line, step
    from the folder's name, data position from the step."""
    folder = tmp_path / "out" / "checkpoint-3"
    folder.mkdir(parents=True)
    for path in (trained / "checkpoint-3").iterdir():
        if path.name in SPEC_FILES or path.name.startswith("policy_"):
            shutil.copy(path, folder / path.name)
    assert main(base_args(tiny_dataset, folder.parent, "--steps", "4", "--resume_from_checkpoint", str(folder))) == 0
    state = json.loads((folder.parent / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "sample": 32} and state["samples_seen"] == 32
