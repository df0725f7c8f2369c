"""Where a run starts: fresh, from a checkpoint to resume, or from one whose weights it is initialised with.

A checkpoint brings its own config (`train_config.json`); the flags given now override it, so the spec's short
resume command continues the run with the policy and settings it was started with. The main process finds (and,
from the Hub, downloads) the checkpoint; every rank gets its answer, or its error, so that all stop or go on
together.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from accel_train import checkpoint as ckpt
from accel_train import hub, pretrained
from accel_train.config import (
    DEFAULT_POLICY_TYPE,
    BasePolicy,
    TrainConfig,
    gives_policy_type,
    parse,
    split_policy_path,
    without_section,
)
from accel_train.errors import TrainError
from accel_train.flags import flag_value
from accel_train.metrics import METRICS_FILE, TRACKER_PATHS
from accel_train.resume import check_policy_type, warn_option_changes

log = logging.getLogger(__name__)


@dataclass
class Start:
    """The config of the run and what it continues from."""

    cfg: TrainConfig
    resume: Path | None = None  # a checkpoint to continue: weights, optimizer, schedule, data position
    init: Path | None = None  # a checkpoint whose weights and processors start a fresh run (--init_from)
    pretrained: Path | None = None  # a lerobot pretrained policy's folder that a fresh run fine-tunes (--policy.path)
    saved: ckpt.TrainerState | None = None  # the resumed checkpoint's trainer state (None for the spec's 4 files)
    step: int = 0

    @property
    def source(self) -> Path | None:
        """The checkpoint the policy's weights and processors come from, if any."""
        return self.resume or self.init

    @property
    def finished(self) -> bool:
        """`--resume_from_checkpoint latest` found a checkpoint at or past --steps: nothing left to train."""
        return self.resume is not None and self.step >= self.cfg.steps


def locate_start(args: list[str], processes: PartialState) -> Start:
    """Parse the command line, find the checkpoint or pretrained policy it continues from, and lay the flags
    over that one's config."""
    policy_path, args = split_policy_path(args)
    # With --policy.path the policy's type and fields come from the pretrained config: parse the rest first.
    cfg = parse(without_section(args, "policy") if policy_path else args)
    if processes.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporary(cfg.output_dir)
    processes.wait_for_everyone()
    if policy_path and cfg.init_from:
        raise TrainError(
            f"--policy.path {policy_path} and --init_from {cfg.init_from} both name the weights to start from: "
            "give one of them."
        )
    resume = _shared_answer(cfg.resume_from_checkpoint, cfg, processes)
    init = None if resume else _shared_answer(cfg.init_from, cfg, processes)
    if resume or init:
        cfg = _reparse_over_checkpoint(args, cfg, resume or init, keep_training_state=resume is not None)
    if resume is not None:
        return _resumed(cfg, resume, policy_path, processes)
    _guard_existing_checkpoints(cfg, processes)
    if policy_path:
        cfg, folder = _parse_over_pretrained(args, policy_path, processes)
        return Start(cfg, pretrained=folder)
    return Start(cfg, init=init)


def _resumed(cfg: TrainConfig, resume: Path, policy_path: str | None, processes: PartialState) -> Start:
    """A resume: its step, and for an adapter (--peft) checkpoint the frozen base it was trained on."""
    saved = ckpt.read_state(resume)
    start = Start(cfg, resume=resume, saved=saved, step=ckpt.resume_step(resume, saved))
    if start.finished and cfg.resume_from_checkpoint != "latest":
        raise TrainError(
            f"--steps {cfg.steps} is not above the step of {resume.name} ({start.step}): nothing to train. "
            "Pass a larger --steps to train further."
        )
    if cfg.peft is not None and cfg.base_policy is not None and not start.finished:
        # The main process locates the base (fetching it into this machine's cache) and verifies its weights once;
        # every rank then takes the files at the location it found.
        location = _main_process_answer(lambda: _adapter_base(cfg, policy_path), processes)
        start.pretrained = pretrained.local_folder(location)
    elif policy_path:
        log.warning("Resuming from %s: its config and weights win over --policy.path %s.", resume, policy_path)
    return start


def _adapter_base(cfg: TrainConfig, policy_path: str | None) -> BasePolicy:
    """Where the frozen base of an adapter checkpoint is: where the run took it (a Hub repo at its commit, or a
    folder), or a copy --policy.path points at; its weights must hash as they did when the run started."""
    base = cfg.base_policy
    if policy_path:
        copy = pretrained.resolve(policy_path, None)  # hashes its weights
        pretrained.check_same_weights(base, copy.sha256)
        return copy
    if base.commit is None and not pretrained.is_local(base.path):
        raise TrainError(
            f"This adapter checkpoint was trained on the pretrained policy in {base.path}, which is not there any "
            f"more. Point --policy.path at a copy of it (its model.safetensors must have sha256 {base.sha256})."
        )
    pretrained.verify(base, pretrained.local_folder(base))
    return base


def _main_process_answer(compute: Callable[[], Any], processes: PartialState) -> Any:
    """`compute()` on the main process; its value, or its TrainError, on every rank (so all stop together)."""
    answer: list[Any] = [None]
    if processes.is_main_process:
        try:
            answer = [("value", compute())]
        except TrainError as error:
            answer = [("error", str(error))]
    broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "error":
        raise TrainError(value)
    return value


def _shared_answer(spec: str | None, cfg: TrainConfig, processes: PartialState) -> Path | None:
    """The checkpoint folder `spec` names, found by the main process."""
    return _main_process_answer(lambda: find_checkpoint(spec, cfg), processes) if spec else None


def _parse_over_pretrained(args: list[str], path: str, processes: PartialState) -> tuple[TrainConfig, Path]:
    """The run's config over the pretrained policy's own: its type and fields, then --policy.<field> flags.

    The main process resolves the source (a Hub revision to its commit); every rank then takes the files at that
    commit, from the cache the main process filled on its machine.
    """
    revision = flag_value(args, "policy.pretrained_revision")
    value = _main_process_answer(lambda: pretrained.resolve(path, revision), processes)
    folder = pretrained.local_folder(value)
    policy = pretrained.read_config(folder)
    given_type = gives_policy_type(args)
    if given_type and given_type != policy["type"]:
        raise TrainError(
            f"--policy.path {path} holds a '{policy['type']}' policy, but --policy.type asks for '{given_type}'. "
            "Drop --policy.type: a fine-tune keeps the pretrained policy's type."
        )
    policy["pretrained_path"] = None  # its weights are loaded from `folder`, by this run (accel_train.model)
    cfg = parse(args, base={"policy": policy, "base_policy": dataclasses.asdict(value)})
    log.info("Fine-tuning the pretrained %s policy %s (%s)", cfg.policy.type, path, value.commit or folder)
    return cfg, folder


def find_checkpoint(spec: str, cfg: TrainConfig) -> Path | None:
    """A folder, `latest` (the newest of the output dir's and, with --hub_repo_id, the Hub's), or hf://..."""
    if hub.is_hub_uri(spec):
        return hub.fetch_checkpoint(spec, cfg.output_dir)
    if spec != "latest":
        return ckpt.resolve(spec, cfg.output_dir)
    local = ckpt.find_latest(cfg.output_dir)
    if cfg.hub_repo_id:
        remote = hub.latest_remote_step(cfg.hub_repo_id, cfg.hub_revision)
        if remote is not None and (local is None or remote > ckpt.step_from_name(local)):
            revision = f"@{cfg.hub_revision}" if cfg.hub_revision else ""
            log.info("The Hub holds a newer checkpoint (step %d) than %s", remote, cfg.output_dir)
            uri = f"{hub.URI_PREFIX}{cfg.hub_repo_id}/{ckpt.name_for(remote)}{revision}"
            return hub.fetch_checkpoint(uri, cfg.output_dir)
    return local


def _reparse_over_checkpoint(args: list[str], cfg: TrainConfig, source: Path, keep_training_state: bool) -> TrainConfig:
    """Config = the checkpoint's config, overridden by what the user passes now; a changed policy type is an error."""
    saved = ckpt.read_train_config(source)
    saved_policy = saved["policy"] if saved else ckpt.read_policy_config(source)
    if saved_policy is None:
        log.warning(
            "%s has no %s or %s: using the policy config of the command line.",
            source,
            ckpt.TRAIN_CONFIG_FILE,
            ckpt.POLICY_CONFIG_FILE,
        )
        return cfg
    explicit_type = gives_policy_type(args) or cfg.policy.type != DEFAULT_POLICY_TYPE  # from flags or --config
    if explicit_type:
        check_policy_type(source, saved_policy.get("type"), cfg.policy.type)
    base = dict(saved) if (saved and keep_training_state) else {}
    base["policy"] = saved_policy
    for key in ("resume_from_checkpoint", "init_from", "overwrite"):  # where to start is never inherited
        base.pop(key, None)
    new = parse(args, base=base)
    if saved and keep_training_state:
        warn_option_changes(source, saved, new)
    return new


def _guard_existing_checkpoints(cfg: TrainConfig, processes: PartialState) -> None:
    """A fresh run never touches an output dir's checkpoints, unless --overwrite says so."""
    existing = ckpt.list_checkpoints(cfg.output_dir)
    if not existing:
        return
    if not cfg.overwrite:
        names = ", ".join(p.name for _, p in existing[-3:])
        raise TrainError(
            f"{cfg.output_dir} already holds checkpoints ({names}) and this run would start from scratch. "
            "To continue it, add --resume_from_checkpoint latest; to discard them, add --overwrite; or choose "
            "another --output_dir."
        )
    if processes.is_main_process:
        log.warning("--overwrite: deleting %d checkpoints in %s", len(existing), cfg.output_dir)
        for _, path in existing:
            shutil.rmtree(path)
        (cfg.output_dir / METRICS_FILE).unlink(missing_ok=True)
        for name in TRACKER_PATHS:
            path = cfg.output_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    processes.wait_for_everyone()
