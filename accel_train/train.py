"""Train a LeRobot policy with Hugging Face Accelerate, checkpointing and resuming without losing work.

    python accel_train/train.py --output_dir OUT --dataset_id REPO_ID [--dataset_root DIR] \\
        [--resume_from_checkpoint OUT/checkpoint-5000 | latest] [--policy.type=act --policy.<field>=...]

The same command runs under `accelerate launch`, `torchrun` and as `accel-train`; `train(**kwargs)` takes every
option as a keyword argument, `train(TrainConfig(...))` a config object. `accel-train plot OUT`,
`accel-train checkpoints OUT|hf://USER/REPO` and `accel-train export CKPT DIR` look at a run's output.
"""

from __future__ import annotations

import logging
import sys
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):  # `python accel_train/train.py`: make the package importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from accel_train import demo_dataset
from accel_train.checkpoint import TrainerState, export, name_for
from accel_train.checkpointer import Checkpointer
from accel_train.config import Every, TrainConfig, config_to_args, kwargs_to_args, print_help
from accel_train.data import TimedBatches, TrainingData, images_to_float, sources_to_read
from accel_train.errors import Preempted, TrainError
from accel_train.hub import HubPusher, write_model_card
from accel_train.metrics import MetricsLogger, StepWindow, start_trackers
from accel_train.model import PolicyParts, build_parts
from accel_train.preemption import PreemptionWatch
from accel_train.sharding import check_fsdp_settings, describe_footprint, footprint
from accel_train.sources import upgrade_flags
from accel_train.start import Start, locate_start
from accel_train.validation import Validator, make_validator

log = logging.getLogger("accel_train")


def train(cfg: TrainConfig | None = None, /, **kwargs: Any) -> TrainerState:
    """Run training. Keyword arguments are the command-line options (`policy={"type": "act", ...}` nests,
    `config="file.yaml"` is --config); a TrainConfig gives the fields it sets, and keywords override those."""
    # Keywords in the old spellings (dataset_id=...) are rewritten first, so that they override the config's
    # dataset section instead of contradicting it.
    return run((config_to_args(cfg) if cfg is not None else []) + upgrade_flags(kwargs_to_args(kwargs)))


@dataclass
class Components:
    """What an optimizer step works with: the prepared policy parts, the accelerator, this rank's batches, and
    the run's settings (seed, accumulation, clipping)."""

    accelerator: Accelerator
    parts: PolicyParts
    batches: TimedBatches
    cfg: TrainConfig


def run(args: list[str]) -> TrainerState:
    """A training run, top to bottom: configure, locate what to continue from, build the data and the policy,
    prepare, loop, finish."""
    processes = start_processes()
    begin = locate_start(args, processes)  # the config, over the config of the checkpoint it continues
    cfg = begin.cfg
    if begin.finished:
        log.info("%s is at step %d of --steps %d: training is complete.", begin.resume, begin.step, cfg.steps)
        return begin.saved or TrainerState(step=begin.step)

    accelerator = make_accelerator(cfg, processes)
    set_seed(cfg.seed)  # model init is seeded: two fresh runs start from the same weights
    data = load_data(cfg, accelerator, begin)
    parts = build_parts(cfg, data.dataset, begin.source, begin.pretrained)
    validator = make_validator(cfg, accelerator, data)
    pusher = make_pusher(cfg, accelerator)
    checkpointer = Checkpointer(accelerator, parts, cfg, pusher)
    parts.prepare(accelerator, cfg.policy.type)
    state = checkpointer.restore(begin, data)
    step = Components(accelerator, parts, data.batches(cfg, accelerator, state.data), cfg)
    summarize(step, data, begin, state)

    start_trackers(accelerator, cfg.log_with, cfg.output_dir, cfg.to_dict(), state.step)
    metrics = MetricsLogger(cfg.output_dir, state.step, cfg.steps, accelerator)
    if begin.resume is not None:
        metrics.record_resume(state.step, begin.resume.name)
    window = StepWindow(accelerator, step.batches, Every(cfg.log_freq, cfg.steps))
    with PreemptionWatch(accelerator) as preemption, closing(metrics):  # the bar is closed before any error
        parts.policy.train()
        while state.step < cfg.steps:
            window.add(*train_step(step, state.step))
            state.advance(step.batches.step_samples, data.epoch_samples)
            metrics.step()
            if window.due(state.step):
                lr = parts.optimizer.param_groups[0]["lr"]
                metrics.record(window.summary(state, lr) | ({"hub_upload_active": pusher.busy} if pusher else {}))
            if validator is not None and validator.due(state.step):
                metrics.record_validation(
                    {"step": state.step, "val_loss": validator.loss(parts.policy, parts.preprocessor)}
                )
            if checkpointer.due(state.step):
                checkpointer.save(state)
                window.restart_clock()  # the write is not training time
            if state.step < cfg.steps and preemption.should_stop(state.step):
                stop_for_preemption(checkpointer, state, preemption.signal_name, cfg.preemption_push_timeout_s)

    finish(step, checkpointer, validator, metrics, state)
    return state


def train_step(c: Components, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns loss and grad norm, on device."""
    accelerator, policy, optimizer = c.accelerator, c.parts.policy, c.parts.optimizer
    accumulation = c.cfg.gradient_accumulation_steps
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        batch = c.parts.preprocessor(images_to_float(next(c.batches), accelerator.device))
        # Dropout and the VAE's noise draw from the global RNG: seeding it from the step, after the data
        # fetch (a fresh loader draws from it once), makes them a pure function of (seed, step, rank),
        # hence the same after a resume as in an uninterrupted run.
        torch.manual_seed(step_seed(c.cfg.seed, step, micro, accelerator.process_index))
        sync = micro == accumulation - 1
        with nullcontext() if sync else accelerator.no_sync(policy), accelerator.autocast():
            loss, _ = policy(batch)
            accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), c.cfg.optimizer.grad_clip_norm)
    optimizer.step()
    if c.parts.scheduler is not None:
        c.parts.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    unwrapped = accelerator.unwrap_model(policy)
    if hasattr(unwrapped, "update"):  # policies with an EMA or target network (lerobot-train does the same)
        unwrapped.update()
    return total, grad_norm


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint32)[0])


def stop_for_preemption(checkpointer: Checkpointer, state: TrainerState, signal_name: str, push_s: float) -> NoReturn:
    """Checkpoint the step just finished (all ranks agree on it), push it within a bounded wait, exit 75."""
    path = checkpointer.save_unless_saved(state)  # submitted to the pusher once published
    if checkpointer.pusher is not None:
        checkpointer.pusher.finish([], timeout_s=push_s)
    raise Preempted(
        f"Stopped by {signal_name} after step {state.step}; {path} is complete. Run the same command "
        "with --resume_from_checkpoint latest to continue (launch/*.slurm requeue on this exit status, 75)."
    )


def finish(
    step: Components,
    checkpointer: Checkpointer,
    validator: Validator | None,
    metrics: MetricsLogger,
    state: TrainerState,
) -> None:
    """How good is it? Then the final model in OUT's root (for lerobot's own loading APIs), pushed if asked."""
    cfg, parts, accelerator = step.cfg, step.parts, step.accelerator
    if validator is not None:
        error, baseline = validator.action_error(parts.policy, parts.preprocessor, parts.postprocessor)
        metrics.record_validation({"step": state.step, "val_action_error": error, "baseline_action_error": baseline})
        log.info(
            "Held-out action error %.4f vs %.4f predicting the mean action (%.2fx better)",
            error,
            baseline,
            baseline / error,
        )
    checkpointer.wait()
    final_files = []
    if accelerator.is_main_process:
        final_files = export(cfg.output_dir / name_for(state.step), cfg.output_dir)
        final_files.append(write_model_card(cfg.to_dict(), cfg.output_dir))
        log.info("Training finished at step %d. Final model in %s", state.step, cfg.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    pusher = checkpointer.pusher
    if pusher is not None and pusher.finish(final_files).final_pushed is False:
        raise TrainError(
            f"Training finished and everything is saved in {cfg.output_dir}, but pushing the final model to "
            f"{cfg.hub_repo_id} failed (see the warnings above). Push {cfg.output_dir} again once the Hub is reachable."
        )


def start_processes() -> PartialState:
    """The processes exist before the Accelerator: its settings (precision, tracker) may come from a checkpoint.
    Without a GPU, Accelerate sets up multi-process (gloo) training only when told it is on CPU."""
    processes = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    keep_process_group_until_exit()
    setup_logging(processes.is_main_process)
    return processes


def make_accelerator(cfg: TrainConfig, processes: PartialState) -> Accelerator:
    accelerator = Accelerator(
        cpu=processes.device.type == "cpu",
        # --mixed_precision bf16|fp16 wins; otherwise the launcher's (configs/accelerate/bf16.yaml), else none.
        mixed_precision=None if cfg.mixed_precision == "no" else cfg.mixed_precision,
        # The schedule advances once per optimizer step, whatever the number of processes (as lerobot-train).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_dir=cfg.output_dir,
    )
    check_fsdp_settings(accelerator)
    cfg.policy.device = accelerator.device.type
    return accelerator


def load_data(cfg: TrainConfig, accelerator: Accelerator, begin: Start) -> TrainingData:
    """The dataset (the demo is created first when asked for and missing), split, and its frame permutation."""
    if cfg.demo_dataset and accelerator.is_main_process:
        demo_dataset.ensure(cfg.dataset.root)
    accelerator.wait_for_everyone()
    saved = begin.saved.datasets if begin.saved and begin.resume else None
    return TrainingData.load(cfg, sources_to_read(cfg, accelerator, saved))


def make_pusher(cfg: TrainConfig, accelerator: Accelerator) -> HubPusher | None:
    """The background Hub uploader, on the main process only, when --push_to_hub."""
    if not (cfg.push_to_hub and accelerator.is_main_process):
        return None
    return HubPusher(cfg.hub_repo_id, cfg.hub_revision, cfg.hub_private, cfg.hub_keep_last, cfg.hub_retries)


def summarize(step: Components, data: TrainingData, begin: Start, state: TrainerState) -> None:
    """The start-up line: what trains on what, how, and from where."""
    cfg, accelerator, policy = step.cfg, step.accelerator, step.parts.policy
    params = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    if begin.resume is not None:
        origin = (
            f"Resumed from {begin.resume} at step {state.step} (epoch {state.data.epoch}, sample {state.data.sample})."
        )
    elif begin.pretrained is not None:
        base = cfg.base_policy
        origin = f"Fine-tuning {base.path}" + (f" at commit {base.commit}." if base.commit else ".")
    else:
        origin = f"Initialised from {begin.init}." if begin.init is not None else "Fresh start."
    log.info(
        "Policy %s: %s parameters (%s trainable). Dataset %s: %d frames, %d episodes, %d usable per epoch. "
        "Effective batch %d = %d per device x %d processes x %d accumulation. Devices: %d x %s. Precision: %s. "
        "Checkpoints every %d steps in %s. Frame cache: %s. %s",
        cfg.policy.type,
        count(params),
        count(trainable),
        data.title,
        len(data.dataset),
        sum(d.num_episodes for d in data.datasets),
        data.epoch_samples,
        step.batches.step_samples,
        cfg.batch_size,
        accelerator.num_processes,
        cfg.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.device.type,
        accelerator.mixed_precision,
        cfg.save_freq,
        cfg.output_dir,
        data.frame_cache,
        origin,
    )
    if step.parts.fsdp_units:
        log.info(describe_footprint(step.parts.fsdp_units, footprint(policy, step.parts.optimizer), count))


def count(number: int) -> str:
    """1234567 -> 1.23M, 4096 -> 4.1K."""
    return f"{number / 1e6:.2f}M" if number >= 1e6 else f"{number / 1e3:.1f}K" if number >= 1e3 else str(number)


_PROCESS_GROUP_HELD: list[Any] = []


def keep_process_group_until_exit() -> None:
    """Hold the default process group until the interpreter exits, so that the DDP model is never its last
    owner: destroying a gloo group from a DDP Reducer's dealloc can deadlock against a gloo worker waiting for
    the GIL. Torch offers no call that waits for its workers to be idle."""
    if torch.distributed.is_initialized():
        _PROCESS_GROUP_HELD.append(torch.distributed.group.WORLD)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # At INFO, Accelerate logs every file of save_state, httpx and fsspec every request and block read (a streamed
    # dataset, Hub pushes); our own lines say enough.
    for name in ("accelerate", "httpx", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print_help()
        return 0
    try:
        run(args)
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("Interrupted: the last complete checkpoint is intact.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
