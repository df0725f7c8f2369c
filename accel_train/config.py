"""The run's configuration: one dataclass, parsed by draccus like lerobot-train's.

Precedence, lowest first: field defaults, the resumed checkpoint's `train_config.json`, `--config FILE.yaml`,
then flags (or `train(**kwargs)`, or the fields a `TrainConfig` given to `train()` sets). Only what the user gave
overrides, so resuming with the short command of the spec keeps the policy the run was started with.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import draccus
import lerobot.policies  # noqa: F401  (registers every policy config type with draccus)
import yaml
from draccus import ChoiceRegistry
from draccus.argparsing import ArgumentParser
from draccus.cfgparsing import parse_string
from draccus.parsers import decoding
from draccus.utils import deflatten
from lerobot.configs.default import PeftConfig
from lerobot.configs.policies import PreTrainedConfig
from lerobot.optim.optimizers import OptimizerConfig
from lerobot.optim.schedulers import LRSchedulerConfig

from accel_train import frame_cache
from accel_train.errors import UsageError
from accel_train.flags import flag_value
from accel_train.sources import DatasetConfig, flag_section, replace_selection, upgrade_flags, upgrade_layer

DEFAULT_POLICY_TYPE = "act"
POSITIVE = ("steps", "batch_size", "gradient_accumulation_steps", "save_freq", "log_freq", "val_max_samples")


@dataclass(frozen=True)
class Every:
    """A periodic event of the run: due every `every` steps and at the last step."""

    every: int
    last: int

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last


@dataclass
class BasePolicy:
    """Where a fine-tune's starting weights came from (`--policy.path`): a folder, or a Hub repo and the commit its
    revision resolved to; and the sha256 of its model.safetensors."""

    path: str
    revision: str | None = None
    commit: str | None = None
    sha256: str | None = None


@dataclass
class TrainConfig:
    # Where checkpoints, metrics and the final model go.
    output_dir: Path | None = None
    # The datasets (lerobot-train's --dataset.*; --dataset_id/--dataset_root still work): accel_train/sources.py.
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Create the embedded demo dataset at --dataset.root when nothing is there (configs/demo.yaml).
    demo_dataset: bool = False
    # Decoded-frame cache (accel_train/frame_cache.py): off, ram (/dev/shm) or disk (~/.cache/accel_train/frames);
    # its folder, and a cap on its size in GB (default: what its filesystem has free, less a reserve). A string, not
    # a Literal: YAML and draccus read `off` as the boolean false.
    frame_cache: str = "off"
    frame_cache_dir: Path | None = None
    frame_cache_gb: float | None = None
    # A checkpoint folder, or "latest" (newest complete checkpoint in output_dir, or a fresh start).
    resume_from_checkpoint: str | None = None
    # Fine-tune: weights and processors from this checkpoint, fresh optimizer, step 0.
    init_from: str | None = None
    # Set from --policy.path=REPO_ID|DIR (and --policy.pretrained_revision): the pretrained lerobot policy this run
    # fine-tunes; recorded with the resolved commit and the sha256 of its weights.
    base_policy: BasePolicy | None = None
    # Dataset keys -> the keys the pretrained policy expects (lerobot's rename_map, applied by the processors), e.g.
    # {"observation.images.front": "observation.images.camera1"}.
    rename_map: dict[str, str] = field(default_factory=dict)
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
    # consolidated: the four documented files (policy.safetensors, processors, optimizer_state.pth), written by the
    # main process. sharded: every process writes its own part of the policy and optimizer (torch.distributed
    # .checkpoint over safetensors shards), resumable on any number of processes; recommended above ~1B parameters.
    checkpoint_format: Literal["consolidated", "sharded"] = "consolidated"
    seed: int = 1000
    # Hold out episodes for validation: a fraction (0.2) or a count (2); 0 trains on every episode.
    val_episodes: float = 0
    # Validation loss every N steps (default: at every checkpoint); at most val_max_samples frames, evenly spread.
    eval_freq: int | None = None
    val_max_samples: int = 256
    # Experiment tracker through Accelerate: tensorboard (OUT/tensorboard), wandb (WANDB_MODE=offline works), none.
    log_with: Literal["none", "tensorboard", "wandb"] = "none"
    num_workers: int = 4
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # None: the policy's own lerobot preset (as lerobot-train does).
    optimizer: OptimizerConfig | None = None
    scheduler: LRSchedulerConfig | None = None
    # Parameter-efficient fine-tuning with lerobot's PEFT wrapper (--peft.method_type=LORA --peft.r=16
    # [--peft.target_modules ...]): only the adapters (and --peft.full_training_modules) train and are saved.
    peft: PeftConfig | None = None
    policy: PreTrainedConfig | None = None

    def validate(self) -> None:
        self.frame_cache = frame_cache.mode_name(self.frame_cache)
        problems = [message for broken, message in self._rules() if broken]
        problems += frame_cache.check_options(self.frame_cache, self.frame_cache_gb)
        if problems:
            raise UsageError("; ".join(problems) + ".")
        self.dataset.sources()  # lists that do not line up are an error before anything loads

    def _rules(self) -> list[tuple[bool, str]]:
        """(broken, what to say) for every rule the options must keep."""
        positive = [(getattr(self, n) < 1, f"--{n} must be at least 1 (got {getattr(self, n)})") for n in POSITIVE]
        optional_positive = [
            (getattr(self, n) is not None and getattr(self, n) < 1, f"--{n} must be at least 1")
            for n in ("save_total_limit", "hub_keep_last", "eval_freq")
        ]
        return [
            (self.output_dir is None, "--output_dir is required"),
            *positive,
            *optional_positive,
            (self.val_episodes < 0, "--val_episodes must be 0 or more"),
            (self.num_workers < 0, "--num_workers must be 0 or more"),
            (self.demo_dataset and not isinstance(self.dataset.root, Path), "--demo_dataset needs one "
             "--dataset.root, the folder to create the demo dataset in"),
            (self.push_to_hub and not self.hub_repo_id, "--push_to_hub needs --hub_repo_id USER/REPO"),
            (bool(self.resume_from_checkpoint and self.init_from),
             "--resume_from_checkpoint and --init_from exclude each other"),
            (self.dataset.streaming and self.frame_cache != "off", f"--frame_cache {self.frame_cache} needs the "
             "whole videos to decode them into the cache; a streamed dataset (--dataset.streaming=true) reads byte "
             "ranges of them: drop one of the two"),
            (self.dataset.streaming and self.dataset.video_backend == "torchcodec", "--dataset.streaming=true "
             "decodes with PyAV (from byte ranges of the remote files): drop --dataset.video_backend=torchcodec"),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(draccus.encode(self), default=str))


def _as_flag_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(draccus.encode(list(value) if isinstance(value, tuple) else value), default=str)
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
            args.append(f"--{key}={_as_flag_text(value)}")
    return args


def config_to_args(cfg: TrainConfig) -> list[str]:
    """The flags that give `cfg`: its fields that differ from the defaults; all of a choice section it sets
    (policy, optimizer, ...: `--policy.type=...` then every field), and of a plain section (dataset) the fields
    that differ. Dict-valued fields stay whole (JSON), since their keys, such as feature names, hold dots."""
    return _differing_flags(cfg, TrainConfig(), "")


def _differing_flags(value: Any, default: Any, prefix: str) -> list[str]:
    args = []
    for f in fields(value):
        mine, theirs, name = getattr(value, f.name), getattr(default, f.name), f"{prefix}{f.name}"
        if mine == theirs:
            continue
        if isinstance(mine, ChoiceRegistry):
            encoded = draccus.encode(mine)
            args.append(f"--{name}.type={mine.type}")
            args += [f"--{name}.{k}={_as_flag_text(v)}" for k, v in encoded.items() if k != "type"]
        elif dataclasses.is_dataclass(mine) and type(mine) is type(theirs):
            args += _differing_flags(mine, theirs, f"{name}.")
        else:
            args.append(f"--{name}={_as_flag_text(draccus.encode(mine))}")
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


def split_policy_path(args: list[str]) -> tuple[str | None, list[str]]:
    """Take `--policy.path=X` / `--policy.path X` out of args: lerobot-train's spelling of "fine-tune this
    pretrained policy", which is not a field of the policy config."""
    rest, path = [], None
    it = iter(args)
    for arg in it:
        if arg == "--policy.path":
            path = next(it, None)
            if path is None or path.startswith("--"):
                raise UsageError("--policy.path needs a Hub repo id or a folder.")
        elif arg.startswith("--policy.path="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def without_section(args: list[str], section: str) -> list[str]:
    """args without the flags of one section (`--policy.*`), values given as separate arguments included."""
    rest, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg.startswith(f"--{section}."):
            skip = "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--")
        else:
            rest.append(arg)
    return rest


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


def gives_policy_type(args: list[str]) -> str | None:
    """The policy type the flags name (`--policy.type=T` or `--policy.type T`), if they name one."""
    return flag_value(args, "policy.type")


def _section_types(args: list[str], layers: dict) -> dict[str, str]:
    """The chosen type of each choice section (policy, optimizer, scheduler): flags over layers."""
    sections = ("policy", "optimizer", "scheduler")
    return {name: flag_value(args, f"{name}.type") or (layers.get(name) or {}).get("type") for name in sections}


def _field_type(path: list[str], chosen: dict[str, str | None]) -> Any:
    """The declared type of the option at a dotted path (None when unknown), walking into chosen sections."""
    cls: Any = TrainConfig
    for depth, name in enumerate(path):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        try:
            hint = typing.get_type_hints(cls).get(name)
        except Exception:  # a config class whose annotations do not resolve: treat its fields as unknown
            return None
        members = [t for t in typing.get_args(hint) if t is not type(None)] if typing.get_args(hint) else [hint]
        hint = members[0] if len(members) == 1 else hint
        if depth == 0 and isinstance(hint, type) and issubclass(hint, ChoiceRegistry):
            if chosen.get(name) not in hint.get_known_choices():
                return None
            hint = hint.get_choice_class(chosen[name])
        cls = hint
    return cls


def bare_flags_to_true(args: list[str], layers: dict) -> list[str]:
    """`--push_to_hub` alone means `--push_to_hub=true`, as in argparse-based trainers, for boolean options only.

    draccus gives every option exactly one value ("expected one argument"); a flag is alone when the next
    argument is another flag or there is none.
    """
    chosen = _section_types(args, layers)
    chosen["policy"] = chosen["policy"] or DEFAULT_POLICY_TYPE
    out = []
    for i, arg in enumerate(args):
        alone = arg.startswith("--") and "=" not in arg and (i + 1 == len(args) or args[i + 1].startswith("--"))
        out.append(f"{arg}=true" if alone and _field_type(arg[2:].split("."), chosen) is bool else arg)
    return out


class _LayeredParser(ArgumentParser):
    """draccus's parser with the layers below the flags given as a dict rather than a config file's path.

    draccus reads layers only from a file (`config_path`); its `_postprocessing` is where the flags meet them,
    so this is the one method to replace: the same steps (parse each flag's string, deflatten the dotted names,
    merge over the layers, decode), without writing the layers to a temporary file.
    """

    def __init__(self, layers: dict):
        super().__init__(TrainConfig, exit_on_error=True)
        self.layers = layers

    def _postprocessing(self, parsed_args: Any) -> TrainConfig:
        flags = {key: parse_string(value) for key, value in vars(parsed_args).items()}
        flags.pop("config_path", None)
        return decoding.decode(TrainConfig, _deep_merge(copy.deepcopy(self.layers), deflatten(flags, sep=".")))


def parse(args: list[str], base: dict | None = None) -> TrainConfig:
    """Parse flags over an optional config file (from args) and an optional base dict (a checkpoint's config)."""
    config_file, args = split_config_flag(args)
    args = upgrade_flags(args)
    layers = upgrade_layer(base or {}, "the checkpoint's train_config.json")
    if config_file is not None:
        from_file = upgrade_layer(yaml.safe_load(config_file.read_text()) or {}, str(config_file))
        continued, asked = ((layer.get("policy") or {}).get("type") for layer in (layers, from_file))
        if continued and asked and continued != asked and not gives_policy_type(args):
            raise UsageError(
                f"{config_file} sets the policy type '{asked}', but this run continues a '{continued}' policy (from "
                "its checkpoint or --policy.path). Use a config file without that policy section, or start a new run."
            )
        layers = _deep_merge(replace_selection(layers, from_file.get("dataset") or {}), from_file)
    layers = replace_selection(layers, flag_section(args))
    cli_type = gives_policy_type(args)
    if cli_type and (layers.get("policy") or {}).get("type", cli_type) != cli_type:
        layers.pop("policy")  # another policy type on the command line replaces the section, fields and all
    if not cli_type and "type" not in (layers.get("policy") or {}):
        args = [f"--policy.type={DEFAULT_POLICY_TYPE}", *args]
    known = {f.name for f in fields(TrainConfig)}
    unknown = [a for a in args if a.startswith("--") and a[2:].split("=", 1)[0].split(".", 1)[0] not in known]
    if unknown:
        raise UsageError(
            f"Unknown option {unknown[0]}. Options are --{', --'.join(sorted(known))}, "
            "--config FILE.yaml and --policy.<field> for any field of the chosen lerobot policy config."
        )
    cfg = _draccus_parse(bare_flags_to_true(args, layers), layers)
    cfg.validate()
    return cfg


def _draccus_parse(args: list[str], layers: dict) -> TrainConfig:
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
            return _LayeredParser(layers).parse_args(args)
    except SystemExit as exit_:
        lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
        detail = lines[-1].split("error:", 1)[1].strip() if lines else f"exit status {exit_.code}"
        raise UsageError(f"Invalid command line: {detail}. Run with --help for the options.") from None
    except Exception as error:  # draccus decoding errors carry no common base class
        message = " ".join(line.strip() for line in str(error).splitlines()) or type(error).__name__
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
