"""What a resume may change since its checkpoint, and what each change costs: the one place that decides.

change since the checkpoint                           cost
policy type                                           refused
checkpoint format version this code does not read     refused (accel_train.checkpoint.READABLE_FORMATS)
number of processes, batch size, accumulation, seed   close: continues at the same sample of the same
                                                      epoch, warned, no longer bit-identical
dataset mix (datasets, episodes, weights, the         close, as above; a streamed dataset is read at the
  commit a streamed dataset is read at)               commit the checkpoint recorded unless told otherwise
checkpoint format (--checkpoint_format)               exact: any format loads into any run
any other option of train_config.json                 warned (old -> new), applied
nothing                                               exact: bit-identical to an uninterrupted run
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accel_train.checkpoint import TRAIN_CONFIG_FILE, TrainerState, is_sharded
from accel_train.config import TrainConfig
from accel_train.data import StepShape
from accel_train.errors import TrainError
from accel_train.sources import upgrade_layer

if TYPE_CHECKING:
    from accel_train.data import TrainingData
    from accel_train.start import Start

log = logging.getLogger(__name__)

# TrainerState fields that a resume may change at the cost of bit-identity.
CLOSE_FIELDS = ("num_processes", "batch_size", "gradient_accumulation_steps", "seed")


def check_policy_type(source: Path, saved_type: str | None, asked_type: str) -> None:
    """A checkpoint resumes (or initialises) only the policy type it holds."""
    if asked_type != saved_type:
        raise TrainError(
            f"{source} holds a '{saved_type}' policy, but this run asks for '{asked_type}'. "
            f"A checkpoint resumes only into the same policy type; drop --policy.type or start a new --output_dir."
        )


def warn_option_changes(source: Path, saved: dict[str, Any], now: TrainConfig) -> None:
    """Options given now that differ from the checkpoint's train_config.json: applied, and said."""
    before = upgrade_layer(saved, f"{source}/{TRAIN_CONFIG_FILE}")
    after = {k: v for k, v in now.to_dict().items() if k not in ("resume_from_checkpoint", "output_dir", "policy")}
    for key, old, value in _changes(before, after):
        if key not in before and value == _default(key):  # an option added since the checkpoint was written
            continue
        log.warning("Resuming with %s changed: %s -> %s", key, old, value)


def _default(option: str) -> Any:
    found = TrainConfig.__dataclass_fields__.get(option)
    return found.default if found is not None else None


def _changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted option, old, new) for each option of `after` whose value differs in `before`, field by field inside
    the dataset section (whose fields a checkpoint written before the section existed partly lacks: not reported)."""
    changes = []
    for key, value in after.items():
        old, name = before.get(key), f"{prefix}{key}"
        if name in ("dataset", "dataset.image_transforms") and isinstance(old, dict) and isinstance(value, dict):
            changes += _changes(old, value, f"{name}.")
        elif old != value and (key in before or not prefix):
            changes.append((name, old, value))
    return changes


def starting_state(cfg: TrainConfig, num_processes: int, start: Start, data: TrainingData) -> TrainerState:
    """The trainer state a run continues at; with another world size, batch or dataset mix, at the same sample.

    A checkpoint without trainer_state.json (another tool's, in the spec's four-file format) continues at the
    data position that `start.step` steps of this run's batch would reach.
    """
    step_samples = StepShape(cfg.batch_size, cfg.gradient_accumulation_steps, num_processes).samples
    state = TrainerState(
        step=0,
        seed=cfg.seed,
        num_processes=num_processes,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        policy_type=cfg.policy.type,
        datasets=data.describe(),
    )
    if start.resume is not None and is_sharded(start.resume) != (cfg.checkpoint_format == "sharded"):
        log.info(
            "Resuming a %s checkpoint into a run that writes %s ones: exact, the format changes nothing else.",
            "sharded" if is_sharded(start.resume) else "consolidated",
            cfg.checkpoint_format,
        )
    saved = start.saved if start.resume is not None else None
    if saved is None:
        for _ in range(start.step):
            state.advance(step_samples, data.epoch_samples)
        return state
    state.step, state.data, state.samples_seen = start.step, saved.data, saved.samples_seen
    changed = {
        name: (getattr(saved, name), getattr(state, name))
        for name in CLOSE_FIELDS
        if getattr(saved, name) != getattr(state, name)
    }
    if saved.datasets and _mix_changed(saved.datasets, state.datasets):
        changed["dataset mix"] = (_mix_text(saved.datasets), _mix_text(state.datasets))
    state.data = state.data.fitted(step_samples, data.epoch_samples)  # after a smaller epoch or a larger step
    if changed:
        log.warning(
            "Resuming with a different %s: the run continues from step %d and sample %d of epoch %d, but "
            "is no longer bit-identical to an uninterrupted run.",
            ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in changed.items()),
            state.step,
            state.data.sample,
            state.data.epoch,
        )
    return state


def _mix_changed(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> bool:
    """Whether the data differs: everything recorded but where each dataset lies on this machine, and the commit
    where both runs read one (a streamed dataset's; a local copy has none to compare)."""
    if len(saved) != len(now):
        return True
    for a, b in zip(saved, now, strict=True):
        ignored = {"root"} | ({"commit"} if not ("commit" in a and "commit" in b) else set())
        if any(a.get(k) != b.get(k) for k in (a.keys() | b.keys()) - ignored):
            return True
    return False


def _mix_text(datasets: list[dict[str, Any]]) -> str:
    return " + ".join(
        f"{d['repo_id']}" + (f" episodes {d['episodes']}" if d.get("episodes") else "")
        + (f" weight {d['weight']:g}" if d.get("weight") else "") + f" [{d['epoch_samples']}/epoch]"
        + (f" at commit {d['commit'][:12]}" if d.get("commit") else "")
        for d in datasets
    )  # fmt: skip
