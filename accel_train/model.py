"""Policy, processors, optimizer and LR schedule, all through lerobot's own factories."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lerobot.configs.policies import PreTrainedConfig
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies import PreTrainedPolicy, make_policy, make_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline, RenameObservationsProcessorStep, rename_stats

from accel_train.checkpoint import PRETRAINED_PROCESSORS, PRETRAINED_WEIGHTS
from accel_train.checkpoint import PROCESSOR_FILES as CHECKPOINT_PROCESSORS
from accel_train.config import TrainConfig
from accel_train.errors import TrainError
from accel_train.features import adopt_dataset_shapes, check_fits
from accel_train.sharding import gather_for_inference, is_fsdp, shard_units

log = logging.getLogger(__name__)

# Policy type -> the extra of pyproject.toml that installs its dependencies (others: `all`).
POLICY_EXTRAS = {"diffusion": "diffusion", "smolvla": "smolvla", "pi0": "pi", "pi05": "pi", "pi0_fast": "pi"}


def build_policy(cfg: TrainConfig, dataset: LeRobotDataset, pretrained: Path | None) -> PreTrainedPolicy:
    """A policy of cfg.policy's type with the dataset's features (lerobot's make_policy): fresh, or with the
    weights of a pretrained policy's folder, loaded by that policy class's own from_pretrained."""
    # make_policy loads a pretrained folder when pretrained_path is set, and a PEFT adapter when use_peft is: this
    # run adds its adapters itself (wrap_with_adapters), on the base from `pretrained`.
    cfg.policy.pretrained_path, cfg.policy.use_peft = pretrained, False
    try:
        policy = make_policy(cfg.policy, ds_meta=dataset.meta, rename_map=cfg.rename_map)
    except ImportError as error:
        extra = POLICY_EXTRAS.get(cfg.policy.type, "all")
        raise TrainError(
            f"The '{cfg.policy.type}' policy needs packages this environment lacks ({error}). Install accel-train's "
            f"extra for it: pip install -e '.[{extra}]' (lerobot's extra of the same name, at the versions lerobot "
            "was released with)."
        ) from None
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        raise TrainError(f"Could not build a '{cfg.policy.type}' policy: {error}") from None
    finally:
        cfg.policy.pretrained_path = None  # the run's config names the weights by base_policy, not by this folder
    if pretrained is not None:
        check_loaded(policy, pretrained / PRETRAINED_WEIGHTS, cfg.policy.type)
    return policy


def check_loaded(policy: PreTrainedPolicy, weights: Path, policy_type: str) -> None:
    """The pretrained weights are in the policy: every tensor that the file and the policy both name holds the
    same values (its first row, cast to the policy's dtype). lerobot's pi0-family loaders catch their own load
    errors, print a warning and return the randomly initialised model; a fine-tune must not start from random
    weights unnoticed. Reads a row per tensor through a memory map: cheap for a 4B-parameter file."""
    from safetensors import safe_open

    state = policy.state_dict()
    with safe_open(weights, framework="pt") as saved:
        shared = [key for key in saved.keys() if key in state]  # noqa: SIM118 (safe_open is not a mapping)
        for key in shared:
            mine, theirs = state[key], saved.get_slice(key)
            shape = list(theirs.get_shape())
            if shape != list(mine.shape):
                differs = f"{key} is {shape} in the file and {list(mine.shape)} in the policy"
            elif shape and not torch.equal(mine[:1].cpu(), theirs[:1].to(mine.dtype)):
                differs = f"the policy's {key} holds other values than the file's"
            else:
                continue
            raise TrainError(
                f"The weights in {weights} did not load into the {policy_type} policy: {differs}. lerobot's loader "
                "for this policy goes on with random weights when loading fails (its message is above). Check that "
                f"--policy.* overrides do not change the model's sizes, and that the folder or repo holds a "
                f"{policy_type} policy saved by lerobot."
            )
    if not shared:
        log.warning("Could not check that %s loaded: none of its tensor names are the policy's.", weights)


def wrap_with_adapters(policy: PreTrainedPolicy, cfg: TrainConfig) -> torch.nn.Module:
    """lerobot's PEFT wrapper: the base frozen, adapters (and --peft.full_training_modules) trainable. The adapter
    config names the base as the user gave it (repo id or folder) at its resolved commit, so lerobot's own PEFT
    loading finds that exact base again."""
    base = cfg.base_policy
    if base is None:
        raise TrainError(
            f"--peft adds {cfg.peft.method_type} adapters to a pretrained policy: give it with --policy.path "
            "(adapters on a policy trained from scratch have nothing to adapt)."
        )
    policy.config.pretrained_path = base.path
    try:
        wrapped = policy.wrap_with_peft(peft_cli_overrides=dataclasses.asdict(cfg.peft))
    except ImportError as error:
        raise TrainError(f"--peft needs the peft package: pip install -e '.[peft]' ({error}).") from None
    except (ValueError, KeyError) as error:  # PEFT: no module matches the targets; lerobot: no base to adapt
        linear = [name for name, module in policy.named_modules() if isinstance(module, torch.nn.Linear)]
        raise TrainError(
            f"Could not add {cfg.peft.method_type} adapters to the {cfg.policy.type} policy: {error}. "
            f"--peft.target_modules names modules by suffix, a list, or a regular expression; its linear "
            f"layers include {', '.join(linear[:6])}{' ...' if len(linear) > 6 else ''}."
        ) from None
    finally:
        policy.config.pretrained_path = None
    if base.commit:
        for adapter in wrapped.peft_config.values():
            adapter.revision = base.commit
    return wrapped


def build_processors(
    cfg: TrainConfig, dataset: LeRobotDataset, source: Path | None, pretrained: Path | None
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """Pre/post-processors from a checkpoint folder; or a pretrained policy's, with this dataset's stats (as
    lerobot-train does for a fine-tune) and the rename map; or new ones from the dataset's stats.

    A checkpoint or pretrained policy without processor files falls back to the dataset's stats with a warning.
    """
    device = {"device_processor": {"device": cfg.policy.device}}
    if source is not None and _has_files(source, CHECKPOINT_PROCESSORS):
        return _load_processors(cfg.policy, source, CHECKPOINT_PROCESSORS, (device, {}))
    # Normalisation stats under the names the policy sees (lerobot's rename_stats; lerobot-train 0.6.1 skips it).
    stats = rename_stats(dataset.meta.stats, cfg.rename_map)
    if pretrained is not None and _has_files(pretrained, PRETRAINED_PROCESSORS):
        policy_cfg = cfg.policy
        features, norm_map = (
            {**policy_cfg.input_features, **policy_cfg.output_features},
            policy_cfg.normalization_mapping,
        )
        pre = {
            **device,
            "normalizer_processor": {"stats": stats, "features": features, "norm_map": norm_map},
            "rename_observations_processor": {"rename_map": dict(cfg.rename_map)},
        }
        post = {
            "unnormalizer_processor": {"stats": stats, "features": policy_cfg.output_features, "norm_map": norm_map}
        }
        return _load_processors(cfg.policy, pretrained, PRETRAINED_PROCESSORS, (pre, post))
    if source is not None or pretrained is not None:
        folder, names = (source, CHECKPOINT_PROCESSORS) if source else (pretrained, PRETRAINED_PROCESSORS)
        missing = " or ".join(name for name in names if not (folder / name).is_file())
        log.warning("%s has no %s: rebuilding the processors from the dataset's statistics.", folder, missing)
    preprocessor, postprocessor = make_pre_post_processors(cfg.policy, dataset_stats=stats)
    for step in preprocessor.steps:
        if isinstance(step, RenameObservationsProcessorStep):
            step.rename_map = dict(cfg.rename_map)
    return preprocessor, postprocessor


def _has_files(folder: Path, names: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in names)


def _load_processors(
    policy_cfg: PreTrainedConfig, folder: Path, names: tuple[str, str], overrides: tuple[dict, dict]
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """lerobot's processor files `names` in `folder`, with (pre, post) `overrides` of their steps' settings."""
    try:
        return make_pre_post_processors(
            policy_cfg,
            pretrained_path=str(folder),
            preprocessor_config_filename=names[0],
            postprocessor_config_filename=names[1],
            preprocessor_overrides=overrides[0],
            postprocessor_overrides=overrides[1],
        )
    except Exception as error:  # a json or stats file that lerobot cannot read
        raise TrainError(
            f"The processors in {folder} could not be loaded ({type(error).__name__}: {error}). Delete {names[0]} "
            f"and {names[1]} there to rebuild them from the dataset's statistics."
        ) from None


def build_optimizer(cfg: TrainConfig, policy: PreTrainedPolicy):
    """Optimizer and LR schedule: the policy's lerobot presets unless --optimizer.* / --scheduler.* say else."""
    if cfg.optimizer is None:
        cfg.optimizer = cfg.policy.get_optimizer_preset()
    if cfg.scheduler is None:
        cfg.scheduler = cfg.policy.get_scheduler_preset()
    optimizer = cfg.optimizer.build(policy.get_optim_params())
    scheduler = cfg.scheduler.build(optimizer, cfg.steps) if cfg.scheduler is not None else None
    return optimizer, scheduler


@dataclass
class PolicyParts:
    """The policy and what trains and feeds it. `prepare` hands the policy, optimizer and schedule to Accelerate
    (DDP, FSDP, mixed precision); the processors stay as they are. Under FSDP the policy's layers are sharded
    first, as units of their own (accel_train.sharding); `fsdp_units` counts them, the root included."""

    policy: PreTrainedPolicy | torch.nn.Module
    preprocessor: PolicyProcessorPipeline
    postprocessor: PolicyProcessorPipeline
    optimizer: torch.optim.Optimizer
    scheduler: Any
    fsdp_units: int = 0

    def prepare(self, accelerator: Accelerator, policy_type: str) -> None:
        if is_fsdp(accelerator):
            self.fsdp_units = shard_units(self.policy, self.optimizer, policy_type, accelerator)
        if self.scheduler is not None:
            self.policy, self.optimizer, self.scheduler = accelerator.prepare(
                self.policy, self.optimizer, self.scheduler
            )
        else:
            self.policy, self.optimizer = accelerator.prepare(self.policy, self.optimizer)
        gather_for_inference(accelerator.unwrap_model(self.policy))


def build_parts(cfg: TrainConfig, dataset: LeRobotDataset, source: Path | None, pretrained: Path | None) -> PolicyParts:
    """The policy (fresh, its weights loaded later by the checkpointer from `source`; or from a pretrained
    policy's folder), its processors, and the optimizer and schedule."""
    if cfg.rename_map and source is None and pretrained is None:
        raise TrainError(
            "--rename_map maps dataset keys to those of a pretrained policy: give the policy with --policy.path "
            "(a policy trained from scratch takes the dataset's own keys)."
        )
    if source is not None or pretrained is not None:
        where = str(source or cfg.base_policy.path)
        check_fits(cfg.policy, dataset, cfg.rename_map, where)
        adopt_dataset_shapes(cfg.policy, dataset, cfg.rename_map)
    policy = build_policy(cfg, dataset, pretrained)
    if cfg.peft is not None:
        policy = wrap_with_adapters(policy, cfg)
    preprocessor, postprocessor = build_processors(cfg, dataset, source, pretrained)
    optimizer, scheduler = build_optimizer(cfg, policy)
    return PolicyParts(policy, preprocessor, postprocessor, optimizer, scheduler)
