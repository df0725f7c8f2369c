"""Train a LeRobot policy with Hugging Face Accelerate, checkpointing and resuming without losing work.

    python accel_train/train.py --output_dir OUT --dataset_id REPO_ID [--dataset_root DIR] \\
        [--resume_from_checkpoint OUT/checkpoint-5000 | latest] [--policy.type=act --policy.<field>=...]

The same command runs under `accelerate launch`, `torchrun` and as `accel-train`; `train(**kwargs)` takes every
option as a keyword argument. `accel-train plot OUT`, `accel-train checkpoints OUT|hf://USER/REPO` and
`accel-train export CKPT DIR` look at a run's output.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python accel_train/train.py`: make the package importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list, set_seed
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from accel_train import checkpoint as ckpt
from accel_train import config as config_
from accel_train import demo_dataset, frame_cache, hub
from accel_train.checkpoint import Checkpointer, TrainerState
from accel_train.config import TrainConfig
from accel_train.data import (
    DataPosition,
    ResumableBatchSampler,
    TimedBatches,
    images_to_float,
    load_dataset,
    make_dataloader,
    make_order,
    split_episodes,
)
from accel_train.errors import Preempted, TrainError, UsageError
from accel_train.hub import HubPusher
from accel_train.metrics import METRICS_FILE, TRACKER_PATHS, MetricsLogger, start_trackers
from accel_train.model import build_optimizer, build_policy, build_processors, check_features
from accel_train.preemption import PreemptionWatch
from accel_train.validation import Validator, held_out_frames

log = logging.getLogger("accel_train")


def train(**kwargs: Any) -> TrainerState:
    """Run training; keyword arguments are the command-line options (`policy={"type": "act", ...}` nests)."""
    return run(config_.kwargs_to_args(kwargs))


def run(args: list[str]) -> TrainerState:
    cfg = config_.parse(args)
    # The processes exist before the Accelerator: its settings (precision, tracker) may come from a checkpoint.
    # Without a GPU, Accelerate sets up multi-process (gloo) training only when told it is on CPU.
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    processes = PartialState(cpu=on_cpu)
    keep_process_group_until_exit()
    setup_logging(processes.is_main_process)
    output_dir = cfg.output_dir

    # 1. What are we continuing from? A checkpoint brings its own config; flags given now override it.
    if processes.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temporary(output_dir)
    processes.wait_for_everyone()
    resume = locate_checkpoint(cfg.resume_from_checkpoint, cfg, processes)
    source = resume or locate_checkpoint(cfg.init_from, cfg, processes)
    if source is not None:
        cfg = reparse_over_checkpoint(args, cfg, source, keep_training_state=resume is not None)
    if resume is None:
        guard_existing_checkpoints(cfg, processes)
    start_state = ckpt.read_state(resume) if resume else None
    start_step = ckpt.resume_step(resume, start_state) if resume else 0
    if resume and start_step >= cfg.steps:
        if cfg.resume_from_checkpoint == "latest":
            log.info("%s is at step %d of --steps %d: training is complete.", resume, start_step, cfg.steps)
            return start_state or TrainerState(step=start_step)
        raise TrainError(
            f"--steps {cfg.steps} is not above the step of {resume.name} ({start_step}): nothing to train. "
            "Pass a larger --steps to train further."
        )

    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        # The schedule advances once per optimizer step, whatever the number of processes (as lerobot-train).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_dir=output_dir,
    )
    require_consolidated_fsdp_state(accelerator)

    # 2. Data. Model init is seeded so that two fresh runs start from the same weights.
    set_seed(cfg.seed)
    if cfg.demo_dataset and accelerator.is_main_process:
        demo_dataset.ensure(cfg.dataset_root)
    accelerator.wait_for_everyone()
    cfg.policy.device = accelerator.device.type
    dataset = load_dataset(cfg.dataset_id, cfg.dataset_root, cfg.policy, cfg.image_transforms, cfg.video_backend)
    cache = frame_cache.attach(dataset, cfg.frame_cache, cfg.frame_cache_dir, cfg.frame_cache_gb)
    train_episodes, val_episodes = split_episodes(dataset.meta.total_episodes, cfg.val_episodes, cfg.seed)
    order = make_order(dataset, cfg.policy, cfg.seed, train_episodes)
    validator = make_validator(cfg, accelerator, dataset, val_episodes)

    # 3. Policy, processors, optimizer: fresh, or from the checkpoint.
    policy = build_policy(cfg, dataset)
    if source is not None:
        check_features(cfg.policy, dataset, str(source))
        ckpt.load_policy_weights(policy, source)
    preprocessor, postprocessor = build_processors(cfg.policy, dataset, source)
    optimizer, scheduler = build_optimizer(cfg, policy)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    names = ckpt.parameter_names(policy, optimizer) if sharded else []
    if resume is not None and not sharded:
        ckpt.load_optimizer_and_scheduler(resume, optimizer, scheduler)
    state = continue_state(cfg, accelerator, start_step, start_state, len(order))

    # 4. Hand the model and optimizer to Accelerate (DDP, FSDP, mixed precision); the data loader stays ours.
    if scheduler is not None:
        policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    if resume is not None and sharded:  # FSDP's optimizer state exists only over the sharded parameters
        ckpt.load_sharded_optimizer(resume, policy, optimizer.optimizer, names)
        ckpt.load_scheduler(resume, scheduler)
    if resume is not None and accelerator.scaler is not None and (resume / ckpt.SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(ckpt.load_tensors(resume / ckpt.SCALER_FILE))
    sampler = ResumableBatchSampler(
        order,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        accelerator.process_index,
        accelerator.num_processes,
        cfg.seed,
        start=state.data,
    )
    batches = TimedBatches(make_dataloader(dataset, sampler, cfg.num_workers, accelerator.device.type == "cuda"))

    train_config = cfg.to_dict()
    checkpointer = Checkpointer(
        accelerator, output_dir, preprocessor, postprocessor, train_config, optimizer.optimizer, cfg.async_checkpoint
    )
    pusher = None
    if cfg.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher(cfg.hub_repo_id, cfg.hub_revision, cfg.hub_private, cfg.hub_keep_last, cfg.hub_retries)
    summarize(cfg, accelerator, policy, dataset, sampler, resume or cfg.init_from, state)
    log.info("Frame cache: %s", cache.describe())

    def on_published(path: Path) -> None:
        """Once a checkpoint is on disk (in the checkpoint writer thread of the main process): push, prune."""
        if pusher is not None:
            pusher.submit(path, ckpt.step_from_name(path))
        if cfg.save_total_limit:
            checkpointer.prune(cfg.save_total_limit, lambda p: p == resume or (pusher and pusher.is_uploading(p)))

    # 5. The loop. Each step: accumulate gradients over micro-batches, clip, step, log, validate, checkpoint.
    start_trackers(accelerator, cfg.log_with, output_dir, train_config, state.step)
    metrics = MetricsLogger(output_dir, state.step, cfg.steps, accelerator)
    if resume is not None:
        metrics.record_resume(state.step, resume.name)
    eval_freq = cfg.eval_freq or cfg.save_freq
    window_loss, window_steps = torch.zeros((), device=accelerator.device), 0
    window_start = time.perf_counter()
    with PreemptionWatch(accelerator) as preemption, closing(metrics):  # the bar is closed before any error
        policy.train()
        while state.step < cfg.steps:
            loss, grad_norm = train_step(
                cfg, accelerator, policy, optimizer, scheduler, preprocessor, batches, state.step
            )
            state.step += 1
            state.samples_seen += sampler.step_samples
            state.data = state.data.advanced(sampler.step_samples, len(order))
            window_loss += loss
            window_steps += 1
            metrics.step()

            if state.step % cfg.log_freq == 0 or state.step == cfg.steps:
                # The only host synchronisation of the loop: every other step runs ahead asynchronously.
                mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
                elapsed = time.perf_counter() - window_start
                metrics.record(
                    {
                        "step": state.step,
                        "loss": mean_loss,
                        "grad_norm": grad_norm.item(),
                        "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": window_steps * sampler.step_samples / elapsed,
                        "data_s": batches.wait_s / window_steps,  # per step, blocked on the loader
                        "epoch": state.data.epoch,
                        "samples_seen": state.samples_seen,
                        "time": time.time(),
                        **({"hub_upload_active": pusher.busy} if pusher is not None else {}),
                    }
                )
                window_loss, window_steps = torch.zeros((), device=accelerator.device), 0
                window_start, batches.wait_s = time.perf_counter(), 0.0

            if validator is not None and (state.step % eval_freq == 0 or state.step == cfg.steps):
                metrics.record_validation({"step": state.step, "val_loss": validator.loss(policy, preprocessor)})

            if state.step % cfg.save_freq == 0 or state.step == cfg.steps:
                checkpointer.save(state, on_published)
                window_start = time.perf_counter()  # the write is not training time

            if state.step < cfg.steps and preemption.should_stop():
                stop_for_preemption(cfg, checkpointer, state, pusher, preemption, metrics, on_published)

    # 6. How good is it? Then the final model in OUT's root, for lerobot's own loading APIs.
    if validator is not None:
        error, baseline = validator.action_error(policy, preprocessor, postprocessor)
        metrics.record_validation({"step": state.step, "val_action_error": error, "baseline_action_error": baseline})
        log.info(
            "Held-out action error %.4f vs %.4f predicting the mean action (%.2fx better)",
            error,
            baseline,
            baseline / error,
        )
    checkpointer.wait()
    if accelerator.is_main_process:
        final_files = ckpt.export(output_dir / f"checkpoint-{state.step}", output_dir)
        log.info("Training finished at step %d. Final model in %s", state.step, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if pusher is not None and pusher.finish(final_files).final_pushed is False:
        raise TrainError(
            f"Training finished and everything is saved in {output_dir}, but pushing the final model to "
            f"{cfg.hub_repo_id} failed (see the warnings above). Push {output_dir} again once the Hub is reachable."
        )
    return state


def stop_for_preemption(
    cfg: TrainConfig,
    checkpointer: Checkpointer,
    state: TrainerState,
    pusher: HubPusher | None,
    preemption: PreemptionWatch,
    metrics: MetricsLogger,
    on_published: Callable[[Path], None],
) -> None:
    """Checkpoint the step just finished (all ranks agree on it), push it within a bounded wait, exit 75."""
    checkpointer.wait()
    path = cfg.output_dir / f"checkpoint-{state.step}"
    if not path.is_dir():
        checkpointer.save(state, on_published)  # submitted to the pusher once published
        checkpointer.wait()
    if pusher is not None:
        pusher.finish([], timeout_s=cfg.preemption_push_timeout_s)
    raise Preempted(
        f"Stopped by {preemption.signal_name} after step {state.step}; {path} is complete. Run the same command "
        "with --resume_from_checkpoint latest to continue (launch/*.slurm requeue on this exit status, 75)."
    )


def locate_checkpoint(spec: str | None, cfg: TrainConfig, processes: PartialState) -> Path | None:
    """The checkpoint folder to start from: found (and, from the Hub, downloaded) by the main process only.

    The answer, or the error, is broadcast so that every rank stops or goes on together.
    """
    if not spec:
        return None
    answer: list[Any] = [None]
    if processes.is_main_process:
        try:
            answer = [("path", find_checkpoint(spec, cfg))]
        except TrainError as error:
            answer = [("error", str(error))]
    broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "error":
        raise TrainError(value)
    return value


def find_checkpoint(spec: str, cfg: TrainConfig) -> Path | None:
    if hub.is_hub_uri(spec):
        return hub.fetch_checkpoint(spec, cfg.output_dir)
    if spec != "latest":
        return ckpt.resolve(spec, cfg.output_dir)
    local = ckpt.find_latest(cfg.output_dir)
    if cfg.hub_repo_id:  # the newest of this output dir and the Hub repo
        remote = hub.latest_remote_step(cfg.hub_repo_id, cfg.hub_revision)
        if remote is not None and (local is None or remote > ckpt.step_from_name(local)):
            revision = f"@{cfg.hub_revision}" if cfg.hub_revision else ""
            log.info("The Hub holds a newer checkpoint (step %d) than %s", remote, cfg.output_dir)
            return hub.fetch_checkpoint(
                f"{hub.URI_PREFIX}{cfg.hub_repo_id}/checkpoint-{remote}{revision}", cfg.output_dir
            )
    return local


def train_step(
    cfg: TrainConfig,
    accelerator: Accelerator,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    preprocessor: Any,
    batches: Any,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns loss and grad norm, on device."""
    accumulation = cfg.gradient_accumulation_steps
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        batch = preprocessor(images_to_float(next(batches), accelerator.device))
        # Dropout and the VAE's noise draw from the global RNG: seeding it from the step, after the data
        # fetch (a fresh loader draws from it once), makes them a pure function of (seed, step, rank),
        # hence the same after a resume as in an uninterrupted run.
        torch.manual_seed(step_seed(cfg.seed, step, micro, accelerator.process_index))
        sync = micro == accumulation - 1
        with nullcontext() if sync else accelerator.no_sync(policy), accelerator.autocast():
            loss, _ = policy(batch)
            accelerator.backward(loss / accumulation)
        total += loss.detach() / accumulation
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.optimizer.grad_clip_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    unwrapped = accelerator.unwrap_model(policy)
    if hasattr(unwrapped, "update"):  # policies with an EMA or target network (lerobot-train does the same)
        unwrapped.update()
    return total, grad_norm


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint32)[0])


def position_after(steps: int, step_samples: int, epoch_samples: int) -> DataPosition:
    position = DataPosition()
    for _ in range(steps):
        position = position.advanced(step_samples, epoch_samples)
    return position


def continue_state(
    cfg: TrainConfig, accelerator: Accelerator, start_step: int, saved: TrainerState | None, epoch_samples: int
) -> TrainerState:
    """The state this run starts from; a resume with another world size or batch continues at the same sample.

    A checkpoint without trainer_state.json (another tool's, in the spec's four-file format) continues at the
    data position that `start_step` steps of this run's batch would reach.
    """
    step_samples = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    state = TrainerState(
        step=start_step,
        data=saved.data if saved else position_after(start_step, step_samples, epoch_samples),
        samples_seen=saved.samples_seen if saved else start_step * step_samples,
        seed=cfg.seed,
        num_processes=accelerator.num_processes,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        policy_type=cfg.policy.type,
    )
    if saved is not None:
        changed = {
            name: (getattr(saved, name), getattr(state, name))
            for name in ("num_processes", "batch_size", "gradient_accumulation_steps", "seed")
            if getattr(saved, name) != getattr(state, name)
        }
        if changed:
            log.warning(
                "Resuming with a different %s: the run continues from step %d and sample %d of epoch %d, but "
                "is no longer bit-identical to an uninterrupted run.",
                ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in changed.items()),
                start_step,
                state.data.sample,
                state.data.epoch,
            )
    return state


def reparse_over_checkpoint(args: list[str], cfg: TrainConfig, source: Path, keep_training_state: bool) -> TrainConfig:
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
    explicit_type = any(a.startswith("--policy.type") for a in args) or cfg.policy.type != config_.DEFAULT_POLICY_TYPE
    if explicit_type and cfg.policy.type != saved_policy.get("type"):
        raise TrainError(
            f"{source} holds a '{saved_policy.get('type')}' policy, but this run asks for '{cfg.policy.type}'. "
            f"A checkpoint resumes only into the same policy type; drop --policy.type or start a new --output_dir."
        )
    base = dict(saved) if (saved and keep_training_state) else {}
    base["policy"] = saved_policy
    # The checkpoint's own location flags must not come back from its saved config.
    for key in ("resume_from_checkpoint", "init_from", "overwrite"):
        base.pop(key, None)
    new = config_.parse(args, base=base)
    if saved and keep_training_state:
        changes = {
            key: (saved.get(key), value)
            for key, value in new.to_dict().items()
            if key not in ("resume_from_checkpoint", "output_dir", "policy") and saved.get(key) != value
        }
        for key, (old, value) in changes.items():
            log.warning("Resuming with %s changed: %s -> %s", key, old, value)
    return new


def make_validator(
    cfg: TrainConfig, accelerator: Accelerator, dataset: LeRobotDataset, episodes: list[int]
) -> Validator | None:
    """Validation on the held-out episodes, from the training dataset, or when that augments images, from a
    second view of it without augmentation."""
    if not episodes:
        return None
    if cfg.image_transforms.enable:
        no_augmentation = dataclasses.replace(cfg.image_transforms, enable=False)
        dataset = load_dataset(cfg.dataset_id, cfg.dataset_root, cfg.policy, no_augmentation, cfg.video_backend)
    frames = held_out_frames(dataset, cfg.policy, episodes, cfg.val_max_samples)
    log.info("Validation on %d frames of held-out episodes %s", len(frames), episodes)
    return Validator(dataset, frames, cfg.batch_size, cfg.num_workers, accelerator, cfg.seed)


def require_consolidated_fsdp_state(accelerator: Accelerator) -> None:
    """Checkpoints hold one consolidated policy and optimizer, so that they resume on any number of GPUs."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is not None and plugin.state_dict_type.name != "FULL_STATE_DICT":
        raise UsageError(
            f"FSDP with fsdp_state_dict_type {plugin.state_dict_type.name}: accel-train checkpoints hold one "
            "consolidated policy.safetensors and optimizer_state.pth, so set fsdp_state_dict_type: "
            "FULL_STATE_DICT in the Accelerate config (as configs/accelerate/fsdp.yaml does)."
        )


def guard_existing_checkpoints(cfg: TrainConfig, processes: PartialState) -> None:
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


def summarize(
    cfg: TrainConfig,
    accelerator: Accelerator,
    policy: torch.nn.Module,
    dataset: Any,
    sampler: ResumableBatchSampler,
    source: Path | str | None,
    state: TrainerState,
) -> None:
    params = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    devices = f"{accelerator.num_processes} x {accelerator.device.type}"
    log.info(
        "Policy %s: %.2fM parameters (%.2fM trainable). Dataset %s: %d frames, %d episodes, %d usable per epoch. "
        "Effective batch %d = %d per device x %d processes x %d accumulation. Devices: %s. Precision: %s. "
        "Checkpoints every %d steps in %s. %s",
        cfg.policy.type,
        params / 1e6,
        trainable / 1e6,
        cfg.dataset_id,
        dataset.num_frames,
        dataset.num_episodes,
        len(sampler.order),
        sampler.step_samples,
        cfg.batch_size,
        accelerator.num_processes,
        cfg.gradient_accumulation_steps,
        devices,
        cfg.mixed_precision,
        cfg.save_freq,
        cfg.output_dir,
        f"Resumed from {source} at step {state.step} (epoch {state.data.epoch}, sample {state.data.sample})."
        if cfg.resume_from_checkpoint and source
        else (f"Initialised from {source}." if source else "Fresh start."),
    )


_PROCESS_GROUP_HELD: list[Any] = []


def keep_process_group_until_exit() -> None:
    """Hold the default process group until the interpreter exits, not until the DDP model is freed.

    Seen at the end of a 2-process CPU run (torch 2.11, gloo): rank 0 hung for good in ~ProcessGroupGloo,
    called from the DDP Reducer's dealloc when run() returned, holding the GIL and waiting for the group's
    mutex, while a gloo worker held that mutex and waited for the GIL to free the last collective's Python
    tensors. With this reference the Reducer is never the group's last owner; the group goes at interpreter
    exit, after the worker has long been idle. Torch offers no call that waits for its workers to be idle.
    """
    if torch.distributed.is_initialized():
        _PROCESS_GROUP_HELD.append(torch.distributed.group.WORLD)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Accelerate logs every file of save_state at INFO; our own line per checkpoint says enough.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        config_.print_help()
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
