"""Policy, processors, optimizer and LR schedule, all through lerobot's own factories."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from lerobot.configs.policies import PreTrainedConfig
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies import PreTrainedPolicy, make_policy, make_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline
from lerobot.utils.feature_utils import dataset_to_policy_features

from accel_train.config import TrainConfig
from accel_train.errors import TrainError

log = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
POSTPROCESSOR_FILE = "postprocessor_config.json"


def check_features(policy_cfg: PreTrainedConfig, dataset: LeRobotDataset, source: str) -> None:
    """A policy config that came from a checkpoint must fit this dataset's features, shape for shape."""
    dataset_features = dataset_to_policy_features(dataset.meta.features)
    for key, feature in {**policy_cfg.input_features, **policy_cfg.output_features}.items():
        if key not in dataset_features:
            raise TrainError(
                f"The policy from {source} expects the feature '{key}', which the dataset "
                f"'{dataset.repo_id}' does not have (it has: {', '.join(sorted(dataset_features))})."
            )
        if tuple(feature.shape) != tuple(dataset_features[key].shape):
            raise TrainError(
                f"The policy from {source} expects '{key}' of shape {tuple(feature.shape)}, but the dataset "
                f"'{dataset.repo_id}' has shape {tuple(dataset_features[key].shape)}: the checkpoint was "
                "trained on a different robot or camera setup."
            )


def build_policy(cfg: TrainConfig, dataset: LeRobotDataset) -> PreTrainedPolicy:
    """A fresh policy of cfg.policy's type, its features taken from the dataset (lerobot's make_policy)."""
    try:
        return make_policy(cfg.policy, ds_meta=dataset.meta)
    except (ValueError, KeyError, NotImplementedError, ImportError) as error:
        raise TrainError(f"Could not build a '{cfg.policy.type}' policy: {error}") from None


def build_processors(
    policy_cfg: PreTrainedConfig, dataset: LeRobotDataset, source: Path | None
) -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
    """Pre/post-processors from a checkpoint folder, or from the dataset's stats.

    A checkpoint without processor files (the spec's format allows it) falls back to the dataset's stats
    with a warning, as lerobot-train does for a fresh run.
    """
    overrides = {"device_processor": {"device": policy_cfg.device}}
    if source is not None:
        missing = [name for name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE) if not (source / name).is_file()]
        if not missing:
            try:
                return make_pre_post_processors(
                    policy_cfg,
                    pretrained_path=str(source),
                    preprocessor_config_filename=PREPROCESSOR_FILE,
                    postprocessor_config_filename=POSTPROCESSOR_FILE,
                    preprocessor_overrides=overrides,
                )
            except Exception as error:  # a json or stats file that lerobot cannot read
                raise TrainError(
                    f"The processors in {source} could not be loaded ({type(error).__name__}: {error}). "
                    f"Delete {PREPROCESSOR_FILE} and {POSTPROCESSOR_FILE} there to rebuild them from the "
                    "dataset's statistics."
                ) from None
        log.warning(
            "%s has no %s: rebuilding the processors from the dataset's statistics.", source, " or ".join(missing)
        )
    return make_pre_post_processors(policy_cfg, dataset_stats=dataset.meta.stats)


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
    (DDP, FSDP, mixed precision); the processors stay as they are."""

    policy: PreTrainedPolicy | torch.nn.Module
    preprocessor: PolicyProcessorPipeline
    postprocessor: PolicyProcessorPipeline
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def prepare(self, accelerator: Accelerator) -> None:
        if self.scheduler is not None:
            self.policy, self.optimizer, self.scheduler = accelerator.prepare(
                self.policy, self.optimizer, self.scheduler
            )
        else:
            self.policy, self.optimizer = accelerator.prepare(self.policy, self.optimizer)


def build_parts(cfg: TrainConfig, dataset: LeRobotDataset, source: Path | None) -> PolicyParts:
    """A fresh policy of cfg.policy's type (weights come later, from the checkpointer), its processors (from
    `source` when it has them, else the dataset's stats), and the optimizer and schedule."""
    policy = build_policy(cfg, dataset)
    if source is not None:
        check_features(cfg.policy, dataset, str(source))
    preprocessor, postprocessor = build_processors(cfg.policy, dataset, source)
    optimizer, scheduler = build_optimizer(cfg, policy)
    return PolicyParts(policy, preprocessor, postprocessor, optimizer, scheduler)
