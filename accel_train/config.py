"""The run's configuration: one dataclass, parsed by draccus like lerobot-train's.

Precedence, lowest first: field defaults, the resumed checkpoint's `train_config.json`, `--config FILE.yaml`,
then flags (or `train(**kwargs)`). Only flags the user gave override, so resuming with the short command of
the spec keeps the policy the run was started with.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import draccus
import lerobot.policies  # noqa: F401  (registers every policy config type with draccus)
import yaml
from lerobot.configs.policies import PreTrainedConfig
from lerobot.optim.optimizers import OptimizerConfig
from lerobot.optim.schedulers import LRSchedulerConfig
from lerobot.transforms import ImageTransformsConfig

from accel_train import frame_cache
from accel_train.errors import UsageError

DEFAULT_POLICY_TYPE = "act"
MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    # Where checkpoints, metrics and the final model go.
    output_dir: Path | None = None
    # LeRobot dataset repo id, and a local copy of it (needed offline).
    dataset_id: str = "ISdept/piper_arm"
    dataset_root: Path | None = None
    # Create the embedded demo dataset at dataset_root when nothing is there (configs/demo.yaml).
    demo_dataset: bool = False
    # "torchcodec" or "pyav"; empty: torchcodec when its FFmpeg libraries load, else pyav.
    video_backend: str | None = None
    # Decoded-frame cache (accel_train/frame_cache.py): off, ram (/dev/shm) or disk (~/.cache/accel_train/frames);
    # its folder, and a cap on its size in GB (default: what its filesystem has free, less a reserve).
    frame_cache: str = "off"
    frame_cache_dir: Path | None = None
    frame_cache_gb: float | None = None
    # A checkpoint folder, or "latest" (newest complete checkpoint in output_dir, or a fresh start).
    resume_from_checkpoint: str | None = None
    # Fine-tune: weights and processors from this checkpoint, fresh optimizer, step 0.
    init_from: str | None = None
    # Allow a fresh run into an output_dir that already holds checkpoints (they are deleted).
    overwrite: bool = False
    # Push every checkpoint to the Hub in the background (token from HF_TOKEN or the login cache).
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = False
    hub_revision: str | None = None
    # Keep only the newest K checkpoints in the Hub repo (older folders removed in a commit).
    hub_keep_last: int | None = None
    # Attempts after the first, with exponential backoff from 1 s, before an upload is given up.
    hub_retries: int = 4
    # On SIGTERM/SIGUSR1: how long to wait for the last checkpoint's upload before exiting.
    preemption_push_timeout_s: float = 60.0
    steps: int = 100_000
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    save_freq: int = 5_000
    log_freq: int = 100
    # Keep only the newest K complete checkpoints locally (never one still uploading or the one resumed from).
    save_total_limit: int | None = None
    # Copy each checkpoint's tensors to CPU memory and write them in the background (host RAM: one checkpoint);
    # false: training waits until the checkpoint is on disk.
    async_checkpoint: bool = True
    seed: int = 1000
    # Hold out episodes for validation: a fraction (0.2) or a count (2); 0 trains on every episode.
    val_episodes: float = 0
    # Validation loss every N steps (default: at every checkpoint); at most val_max_samples frames, evenly spread.
    eval_freq: int | None = None
    val_max_samples: int = 256
    # Experiment tracker through Accelerate: tensorboard (OUT/tensorboard), wandb (WANDB_MODE=offline works), none.
    log_with: str = "none"
    num_workers: int = 4
    mixed_precision: str = "no"
    # None: the policy's own lerobot preset (as lerobot-train does).
    optimizer: OptimizerConfig | None = None
    scheduler: LRSchedulerConfig | None = None
    image_transforms: ImageTransformsConfig = field(default_factory=ImageTransformsConfig)
    policy: PreTrainedConfig | None = None

    def validate(self) -> None:
        problems = []
        if self.output_dir is None:
            problems.append("--output_dir is required")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "save_freq", "log_freq"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.log_with not in TRACKERS:
            problems.append(f"--log_with must be one of {', '.join(TRACKERS)}")
        if self.val_episodes < 0 or self.val_max_samples < 1 or (self.eval_freq is not None and self.eval_freq < 1):
            problems.append("--val_episodes must be 0 or more, --val_max_samples and --eval_freq at least 1")
        if self.num_workers < 0:
            problems.append("--num_workers must be 0 or more")
        if self.video_backend not in (None, "torchcodec", "pyav"):
            problems.append("--video_backend must be torchcodec or pyav")
        self.frame_cache = frame_cache.mode_name(self.frame_cache)
        problems += frame_cache.check_options(self.frame_cache, self.frame_cache_gb)
        if self.demo_dataset and self.dataset_root is None:
            problems.append("--demo_dataset needs --dataset_root, the folder to create the demo dataset in")
        if self.push_to_hub and not self.hub_repo_id:
            problems.append("--push_to_hub needs --hub_repo_id USER/REPO")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append("--save_total_limit must be at least 1")
        if self.hub_keep_last is not None and self.hub_keep_last < 1:
            problems.append("--hub_keep_last must be at least 1")
        if self.resume_from_checkpoint and self.init_from:
            problems.append("--resume_from_checkpoint and --init_from exclude each other")
        if problems:
            raise UsageError("; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(draccus.encode(self), default=str))


def _flag_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def kwargs_to_args(kwargs: dict[str, Any]) -> list[str]:
    """`train(steps=5, policy={"type": "act", "dim_model": 64})` -> the equivalent flags.

    Nested dicts flatten to dotted flags, so a keyword call goes through exactly the parser the CLI uses.
    Dotted keys (`**{"policy.dim_model": 64}`) work too.
    """
    args = []
    for key, value in kwargs.items():
        if isinstance(value, dict):
            args += kwargs_to_args({f"{key}.{k}": v for k, v in value.items()})
        else:
            args.append(f"--{key}={_flag_value(value)}")
    return args


def split_config_flag(args: list[str]) -> tuple[Path | None, list[str]]:
    """Take `--config FILE` / `--config=FILE` out of args (draccus calls it --config_path)."""
    rest, config = [], None
    it = iter(args)
    for arg in it:
        if arg == "--config":
            config = next(it, None)
            if config is None:
                raise UsageError("--config needs a file name.")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if config is not None and not Path(config).is_file():
        raise UsageError(f"Config file {config} does not exist (the shipped ones are under configs/).")
    return (Path(config) if config else None), rest


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            # A different policy/optimizer type replaces the whole section instead of mixing fields.
            if value.get("type", merged[key].get("type")) != merged[key].get("type"):
                merged[key] = value
            else:
                merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _gives_policy_type(args: list[str], layers: dict) -> bool:
    return any(a.startswith("--policy.type") for a in args) or "type" in (layers.get("policy") or {})


def parse(args: list[str], base: dict | None = None) -> TrainConfig:
    """Parse flags over an optional config file (from args) and an optional base dict (a checkpoint's config)."""
    config_file, args = split_config_flag(args)
    layers = dict(base or {})
    if config_file is not None:
        layers = _deep_merge(layers, yaml.safe_load(config_file.read_text()) or {})
    cli_type = next((a.split("=", 1)[1] for a in args if a.startswith("--policy.type=")), None)
    if cli_type and (layers.get("policy") or {}).get("type", cli_type) != cli_type:
        layers.pop("policy")  # another policy type on the command line replaces the section, fields and all
    if not _gives_policy_type(args, layers):
        args = [f"--policy.type={DEFAULT_POLICY_TYPE}", *args]
    known = {f.name for f in fields(TrainConfig)}
    unknown = [a for a in args if a.startswith("--") and a[2:].split("=", 1)[0].split(".", 1)[0] not in known]
    if unknown:
        raise UsageError(
            f"Unknown option {unknown[0]}. Options are --{', --'.join(sorted(known))}, "
            "--config FILE.yaml and --policy.<field> for any field of the chosen lerobot policy config."
        )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as merged:
        yaml.safe_dump(layers, merged, sort_keys=False)  # key order matters: it orders the camera tokens
        merged.flush()
        cfg = _draccus_parse(args, Path(merged.name) if layers else None)
    cfg.validate()
    return cfg


def _draccus_parse(args: list[str], config_path: Path | None) -> TrainConfig:
    """Run draccus, turning its argparse usage dump or decoding traceback into one readable line."""
    stderr = io.StringIO()
    policies_logger = logging.getLogger("lerobot.configs.policies")
    level = policies_logger.level
    # The policy config warns about its (not yet chosen) device while parsing, through its own logger and through
    # lerobot's device_utils on the root logger ("No accelerated backend detected"); the trainer picks the device.
    policies_logger.setLevel(logging.ERROR)
    root = logging.getLogger()
    root.addFilter(_no_device_guess)
    try:
        with contextlib.redirect_stderr(stderr):
            return draccus.parse(TrainConfig, config_path=config_path, args=args)
    except SystemExit as exit_:
        lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
        detail = lines[-1].split("error:", 1)[1].strip() if lines else f"exit status {exit_.code}"
        raise UsageError(f"Invalid command line: {detail}. Run with --help for the options.") from None
    except Exception as error:  # draccus decoding errors carry no common base class
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "type" in message and "policy" in message.lower():
            known = ", ".join(sorted(PreTrainedConfig.get_known_choices()))
            message += f" (known policy types: {known})"
        raise UsageError(f"Invalid configuration: {message}.") from None
    finally:
        policies_logger.setLevel(level)
        root.removeFilter(_no_device_guess)


def _no_device_guess(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No accelerated backend detected")


def print_help() -> None:
    """draccus's option list (every field, including the chosen policy's)."""
    try:
        draccus.parse(TrainConfig, args=["--help"])
    except SystemExit:
        pass
