"""What the main process shows and records: a tqdm bar, a log line per --log_freq steps, OUT/metrics.jsonl,
and the same numbers in an experiment tracker (TensorBoard, wandb) through Accelerate's tracking API.

metrics.jsonl holds three kinds of records, each with a "step": training ("loss", "lr", ...), validation
("val_loss", and at the end "val_action_error", "baseline_action_error") and resume points ("resumed_from").
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from accel_train.checkpoint import TrainerState
from accel_train.config import Every
from accel_train.data import TimedBatches

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
TRACKER_PATHS = (TENSORBOARD_DIR, "wandb", WANDB_ID_FILE)  # what --overwrite deletes with the checkpoints


def start_trackers(
    accelerator: Accelerator, log_with: str, output_dir: Path, config: dict[str, Any], start_step: int
) -> None:
    """Open the tracker so that a resumed run continues the same curves without duplicated steps.

    TensorBoard: events in OUT/tensorboard; `purge_step` hides what a run that died after its last checkpoint
    logged past it. wandb: one run id per output dir (kept in OUT/wandb_run_id), resumed; offline when
    WANDB_MODE=offline. wandb ignores steps it has already seen, which after an exact resume hold the same values.
    """
    if log_with == "none":
        return
    init_kwargs: dict[str, dict[str, Any]] = {}
    if log_with == "tensorboard":
        init_kwargs["tensorboard"] = {"purge_step": start_step + 1} if start_step else {}
    if log_with == "wandb":
        id_file = output_dir / WANDB_ID_FILE
        if accelerator.is_main_process and not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:16])
        accelerator.wait_for_everyone()
        init_kwargs["wandb"] = {"id": id_file.read_text().strip(), "resume": "allow", "dir": str(output_dir)}
        init_kwargs["wandb"]["name"] = output_dir.name
    project = TENSORBOARD_DIR if log_with == "tensorboard" else "accel-train"
    accelerator.init_trackers(project, config=_scalars(config), init_kwargs=init_kwargs)


def _scalars(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to the scalar values trackers accept (TensorBoard's hparams refuse None and lists)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written by a run that died after its last checkpoint) so a resumed run's
    metrics continue without duplicated steps. Rewritten atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Main-process only; other ranks get an instance whose calls do nothing visible."""

    def __init__(self, output_dir: Path, start_step: int, total_steps: int, accelerator: Accelerator):
        self.accelerator = accelerator
        self.enabled = enabled = accelerator.is_main_process
        self.path = output_dir / METRICS_FILE
        if enabled:
            truncate_after(self.path, start_step)
        self.bar = tqdm(
            initial=start_step,
            total=total_steps,
            desc="Training",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
            # Under SLURM and in CI there is no terminal: print the bar rarely instead of every update.
            mininterval=1.0 if os.isatty(2) else 30.0,
        )

    def step(self) -> None:
        self.bar.update(1)

    def record(self, metrics: dict[str, Any]) -> None:
        """One log line, one metrics.jsonl record, the tracker's scalars."""
        if not self.enabled:
            return
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", smp_s=f"{metrics['samples_per_s']:.1f}"
        )
        log.info(
            "step %d  loss %.4f  lr %.2e  grad_norm %.3f  samples/s %.1f  data_s %.3f  epoch %d",
            metrics["step"],
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            metrics["samples_per_s"],
            metrics["data_s"],
            metrics["epoch"],
        )
        self._write(metrics)

    def record_validation(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        log.info("step %d  %s", metrics["step"], "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
        self._write(metrics)

    def record_resume(self, step: int, checkpoint: str) -> None:
        """A resume point, marked on the curves by `accel-train plot`."""
        if self.enabled:
            self._write({"step": step, "resumed_from": checkpoint, "time": time.time()}, track=False)

    def _write(self, metrics: dict[str, Any], track: bool = True) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(metrics) + "\n")
        if track:
            numbers = {k: v for k, v in metrics.items() if k not in ("step", "time") and isinstance(v, (int, float))}
            self.accelerator.log(numbers, step=metrics["step"])

    def close(self) -> None:
        self.bar.close()


class StepWindow:
    """The training steps since the last log line, summed where they are computed.

    Losses add up on the device, so a step never waits for its loss; `summary` reads them back (the mean over
    the window's steps and all ranks), which is a host synchronisation, done only when `due`.
    """

    def __init__(self, accelerator: Accelerator, batches: TimedBatches, every: Every):
        self.accelerator, self.batches, self.every = accelerator, batches, every
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.steps = torch.zeros((), device=self.accelerator.device), 0
        self.grad_norm: torch.Tensor | None = None
        self.batches.wait_s = 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.grad_norm = grad_norm
        self.steps += 1

    def due(self, step: int) -> bool:
        return self.every.due(step)

    def restart_clock(self) -> None:
        """After a pause that is not training (a checkpoint write), the window's time counts from now."""
        self.start = time.perf_counter()

    def summary(self, state: TrainerState, lr: float) -> dict[str, Any]:
        """The record of the window (every rank must call it: the loss is reduced over ranks); then a new one."""
        mean_loss = self.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps
        elapsed = time.perf_counter() - self.start
        record = {
            "step": state.step,
            "loss": mean_loss,
            "grad_norm": self.grad_norm.item(),
            "lr": lr,
            "samples_per_s": self.steps * self.batches.step_samples / elapsed,
            "data_s": self.batches.wait_s / self.steps,  # per step, blocked on the loader
            "epoch": state.data.epoch,
            "samples_seen": state.samples_seen,
            "time": time.time(),
        }
        if self.accelerator.device.type == "cuda":  # this process's peak since the start, weights included
            record["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self._reset()
        return record
