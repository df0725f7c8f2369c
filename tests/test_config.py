"""The command line as users type it: boolean flags alone, choices with clear errors, config objects, layers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from accel_train.config import TrainConfig, config_to_args, parse
from accel_train.errors import UsageError

DEMO = ["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", "/tmp/unused"]


def test_a_boolean_flag_alone_means_true_and_other_flags_still_need_a_value() -> None:
    cfg = parse([*DEMO, "--push_to_hub", "--hub_repo_id", "me/x", "--overwrite", "--image_transforms.enable",
                 "--policy.use_vae", "--async_checkpoint=false"])  # fmt: skip
    assert cfg.push_to_hub and cfg.overwrite and cfg.dataset.image_transforms.enable and cfg.policy.use_vae
    assert cfg.async_checkpoint is False
    assert parse([*DEMO, "--policy.use_vae", "false"]).policy.use_vae is False  # a value after it still counts
    with pytest.raises(UsageError, match="--steps: expected one argument"):
        parse([*DEMO, "--steps"])


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--mixed_precision=fp8", "invalid choice: 'fp8' (choose from 'no', 'bf16', 'fp16')"),
        ("--log_with=mlflow", "invalid choice: 'mlflow' (choose from 'none', 'tensorboard', 'wandb')"),
        ("--video_backend=ffmpeg", "Cannot convert 'ffmpeg' (<class 'str'>) into one of: torchcodec, pyav"),
    ],
)
def test_choices_are_refused_with_the_allowed_values(flag: str, expected: str) -> None:
    with pytest.raises(UsageError) as error:
        parse([*DEMO, flag])
    assert expected in str(error.value) and error.value.exit_code == 2


def test_choices_from_a_config_file_are_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mixed_precision: fp8\n")
    with pytest.raises(UsageError, match="Cannot convert 'fp8'.*into one of: no, bf16, fp16"):
        parse(["--config", str(config), "--output_dir", "/tmp/unused"])


def test_layers_are_merged_in_order_without_a_temporary_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults < base (a checkpoint's config) < --config file < flags; no file is written to do it."""
    monkeypatch.setattr("tempfile.NamedTemporaryFile", None)  # any use would fail
    base = {"steps": 7, "seed": 3, "policy": {"type": "act", "dim_model": 32, "n_heads": 4}}
    cfg = parse(["--output_dir", "/tmp/unused", "--seed", "5", "--policy.n_heads=2"], base=base)
    assert (cfg.steps, cfg.seed, cfg.policy.dim_model, cfg.policy.n_heads) == (7, 5, 32, 2)
    cfg = parse([*DEMO, "--steps", "9"], base=base)  # the file's policy replaces the base's fields it sets
    assert (cfg.steps, cfg.seed, cfg.policy.dim_model, cfg.policy.n_heads) == (9, 1000, 64, 2)


def test_a_config_object_gives_the_flags_that_rebuild_it() -> None:
    cfg = parse([*DEMO, "--steps", "5", "--mixed_precision", "bf16", "--policy.use_vae=false"])
    assert parse(config_to_args(cfg)) == cfg
    assert config_to_args(TrainConfig(output_dir=Path("/tmp/o"))) == ["--output_dir=/tmp/o"]


def test_train_takes_a_config_object_and_keywords_override_it(tiny_dataset: Path, tmp_path: Path) -> None:
    from accel_train.train import train

    cfg = parse([*DEMO, "--dataset_root", str(tiny_dataset), "--demo_dataset=false", "--num_workers", "0",
                 "--val_episodes", "0", "--steps", "50", "--save_freq", "1"])  # fmt: skip
    cfg.output_dir = tmp_path / "out"
    state = train(cfg, steps=1)
    assert state.step == 1 and (tmp_path / "out" / "checkpoint-1").is_dir()
