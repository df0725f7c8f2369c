"""Loss and action error on held-out episodes, computed the same way on any number of processes.

Every rank runs the same number of forward passes (a short rank repeats a batch with weight 0): under FSDP each
forward gathers parameters collectively, so unequal counts would hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from accel_train.config import Every, TrainConfig
from accel_train.data import TrainingData, as_one, held_out_frames, images_to_float, open_datasets

log = logging.getLogger(__name__)

ACTION = "action"


def make_validator(cfg: TrainConfig, accelerator: Accelerator, data: TrainingData) -> Validator | None:
    """Validation on the held-out episodes (none: no validator), from the training dataset, or when that augments
    images, from a second view of it without augmentation."""
    if not any(data.held_out):
        return None
    dataset = data.dataset
    if cfg.dataset.image_transforms.enable:
        no_augmentation = dataclasses.replace(cfg.dataset.image_transforms, enable=False)
        dataset = as_one(open_datasets(data.reads, cfg, no_augmentation)[0], data.sources)
    frames = held_out_frames(data, cfg.policy, cfg.val_max_samples)
    # Per dataset, in order: the same repo id may appear twice in a mix.
    held_out = ", ".join(f"{s.repo_id} {h}" for s, h in zip(data.sources, data.held_out, strict=True))
    log.info("Validation on %d frames of held-out episodes: %s", len(frames), held_out)
    return Validator(dataset, frames, cfg, accelerator, Every(cfg.eval_freq or cfg.save_freq, cfg.steps))


class Validator:
    """Validation over fixed held-out frames; a dataset without augmentation, its own loader per pass."""

    def __init__(
        self, dataset: LeRobotDataset, frames: list[int], cfg: TrainConfig, accelerator: Accelerator, every: Every
    ):
        self.dataset, self.accelerator, self.seed = dataset, accelerator, cfg.seed
        self.num_workers, self.every = cfg.num_workers, every
        batches = [frames[i : i + cfg.batch_size] for i in range(0, len(frames), cfg.batch_size)]
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = batches[rank::world]
        rounds = math.ceil(len(batches) / world)
        # (frames, weight): a rank with fewer batches repeats its first one, weighted 0.
        self.batches = [(b, 1.0) for b in mine] + [(batches[0], 0.0)] * (rounds - len(mine))

    def due(self, step: int) -> bool:
        return self.every.due(step)

    def _loader(self) -> Iterator[tuple[dict[str, Any], float]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[frames for frames, _ in self.batches],
            num_workers=self.num_workers,
        )
        for (frames, weight), batch in zip(self.batches, loader, strict=True):
            yield images_to_float(batch, self.accelerator.device), weight * len(frames)

    @torch.no_grad()
    def loss(self, policy: torch.nn.Module, preprocessor: Any) -> float:
        """The policy's own loss in eval mode (for ACT: L1 of the normalised action chunk, no KL term)."""
        totals = torch.zeros(2, device=self.accelerator.device)  # weighted loss sum, weight sum
        with self._eval_mode(policy) as model:
            for batch, weight in self._loader():
                with self.accelerator.autocast():
                    loss, _ = model(preprocessor(batch))
                totals += torch.stack([loss.float() * weight, torch.tensor(weight, device=totals.device)])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1]).item()

    @torch.no_grad()
    def action_error(self, policy: torch.nn.Module, preprocessor: Any, postprocessor: Any) -> tuple[float, float]:
        """Mean absolute error of the predicted action chunk, in the dataset's units, over the non-padded steps;
        and that of always predicting the dataset's mean action (its stats cover every episode, held-out ones
        included, which only favours the baseline)."""
        mean = torch.as_tensor(self.dataset.meta.stats[ACTION]["mean"], dtype=torch.float32)
        totals = torch.zeros(3, dtype=torch.float64)  # policy error sum, baseline error sum, element count
        with self._eval_mode(policy) as model:
            for batch, weight in self._loader():
                truth = batch[ACTION].float().cpu()
                if truth.ndim == 2:  # policies that predict one action per frame
                    truth = truth.unsqueeze(1)
                with self.accelerator.autocast():
                    chunk = model.predict_action_chunk(preprocessor(batch))
                predicted = postprocessor(chunk).float().cpu()
                steps = min(predicted.shape[1], truth.shape[1])
                valid = ~batch["action_is_pad"][:, :steps].cpu() if "action_is_pad" in batch else None
                valid = torch.ones(truth.shape[:1] + (steps,), dtype=torch.bool) if valid is None else valid
                mask = valid.unsqueeze(-1).expand(-1, -1, truth.shape[-1]) * weight
                truth = truth[:, :steps]
                totals += torch.stack(
                    [
                        ((predicted[:, :steps] - truth).abs() * mask).sum(),
                        ((mean - truth).abs() * mask).sum(),
                        mask.sum(),
                    ]
                ).double()
        totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

    @contextlib.contextmanager
    def _eval_mode(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The unwrapped policy in eval mode under a fixed RNG (diffusion draws noise); training state restored."""
        model = self.accelerator.unwrap_model(policy)
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            model.eval()
            try:
                yield model
            finally:
                model.train()
