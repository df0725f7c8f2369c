"""Saving and restoring a run's state: the one owner of both directions.

`Checkpointer.save(state)` writes `OUT/checkpoint-<step>/` (layout in accel_train.checkpoint) through Accelerate's
`save_state` on every rank; `Checkpointer.restore(start)` reads one back through Accelerate's `load_state`. Both
run the parts of `accel_train.checkpoint_parts.registry` from the hooks Accelerate calls (`save` from the save
hook, `load` from the load hook), in the same order, so what is saved is what is loaded, the same way.

Under FSDP the files are the same consolidated ones: saving gathers each rank's shards to the main process,
loading scatters the full tensors to the shards (torch's full state dicts), so an FSDP checkpoint resumes on one
GPU and the reverse. Training waits only while the parts copy their state to CPU memory (under FSDP each rank's
own shards); gathering, serialising, flushing, hashing and publishing run in a background thread.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import logging
import random
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from accel_train.checkpoint import (
    ACCELERATE_RNG_FILES,
    TMP_PREFIX,
    TrainerState,
    _fsync,
    is_sharded,
    list_checkpoints,
    name_for,
    step_from_name,
    write_manifest,
)
from accel_train.checkpoint_parts import Deferred, Part, RunState, parameter_names, registry
from accel_train.config import Every, TrainConfig
from accel_train.errors import TrainError
from accel_train.model import PolicyParts
from accel_train.resume import starting_state
from accel_train.sharding import is_fsdp

if TYPE_CHECKING:
    from accel_train.data import TrainingData
    from accel_train.hub import HubPusher
    from accel_train.start import Start

log = logging.getLogger(__name__)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """load_state sets the global RNGs from a `random_states_<rank>.pkl` it finds in the folder (read with
    weights_only=True): accel-train's checkpoints have none, another tool's may. The run's RNGs stay as they are
    (it re-seeds from (seed, step, rank) at every step anyway)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    devices = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if devices is not None:
            torch.cuda.set_rng_state_all(devices)


def describe(error: Exception) -> str:
    """For the one-line error: an OSError says what it is ("[Errno 28] No space left on device"), others not."""
    return str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"


class Checkpointer:
    """Saves the run's state as checkpoints and restores it from them.

    Built before `PolicyParts.prepare` (it names the parameters, which FSDP replaces), used after it: `restore`
    once, `save` whenever `due`, `wait` before the end. The main process publishes each folder, submits it to the
    Hub pusher and prunes old checkpoints (--save_total_limit).
    """

    def __init__(self, accelerator: Accelerator, parts: PolicyParts, cfg: TrainConfig, pusher: HubPusher | None):
        self.accelerator = accelerator
        self.output_dir = cfg.output_dir
        self.cfg = cfg
        self.pusher = pusher
        self.schedule = Every(cfg.save_freq, cfg.steps)
        self.resumed_from: Path | None = None
        fsdp = is_fsdp(accelerator)
        distributed = torch.distributed.is_initialized() and accelerator.num_processes > 1
        self.run = RunState(
            accelerator,
            parts,
            cfg.to_dict(),
            asynchronous=cfg.async_checkpoint,
            fsdp=fsdp,
            # The writer threads' collectives (FSDP's gathers, sharded checkpoints' plans) go over a group of their
            # own (gloo: CPU tensors), never interleaved with training's. A timeout, so that a rank whose write
            # failed stops the others with an error rather than a hang.
            gather_group=torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(minutes=10))
            if distributed
            else None,
            # FSDP replaces the parameter objects; their names, taken now, map the optimizer's ids on load.
            parameter_names=parameter_names(parts.policy, parts.optimizer) if fsdp else [],
        )
        self.sharded = cfg.checkpoint_format == "sharded"
        self.parts: list[Part] = registry(self.run, self.sharded)  # what a save writes
        self._loading: list[Callable[[Path], None]] = []
        self._deferred: list[Deferred] = []
        self._error: Exception | None = None
        self._load_error: Exception | None = None
        self._writer: threading.Thread | None = None
        self._background_failure: tuple[int, str] | None = None
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    # Restoring

    def restore(self, start: Start, data: TrainingData) -> TrainerState:
        """Load what `start` continues from into the prepared parts; return the state the run continues at.

        A resume loads every part; --init_from the policy's weights only (its processors and config were read
        when the run was built from it). Either format loads into a run that writes either.
        """
        if start.source is not None:
            sharded = is_sharded(start.source)
            parts = self.parts if sharded == self.sharded else registry(self.run, sharded)
            if start.resume is not None:
                self._loading = [part.load for part in parts]
            else:  # the first part holds the weights (PolicyWeights, or ShardedTensors without the optimizer)
                self._loading = [functools.partial(parts[0].load, with_optimizer=False) if sharded else parts[0].load]
            self._load_error = None
            try:
                with self._only_hooks(), _rng_kept():
                    self.accelerator.load_state(str(start.source))
            except RuntimeError as error:  # Accelerate's own checks of the folder (e.g. foreign custom states)
                raise TrainError(f"Accelerate could not read the checkpoint {start.source}: {error}") from None
            finally:
                self._loading = []
            if self._load_error is not None:  # a part's error, as the part raised it
                raise self._load_error
        if start.resume is not None:
            self.resumed_from = start.resume
        return starting_state(self.cfg, self.accelerator.num_processes, start, data)

    def _load_hook(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """load_state's hook: every part to load reads its files. An error is kept for restore() to raise as it
        is, apart from Accelerate's own."""
        try:
            for load in self._loading:
                load(Path(input_dir))
        except Exception as error:
            self._load_error = error

    # Saving

    def _save_hook(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        """save_state's hook, on every rank: every part saves (copies, small files); what it leaves to the
        writer thread is kept for it. An error is kept for save(), which reports it on every rank after the
        barrier, so that no rank is left waiting."""
        weights.clear()
        try:
            for part in self.parts:
                deferred = part.save(Path(output_dir))
                if deferred is not None:
                    self._deferred.append(deferred)
        except Exception as error:  # e.g. disk full, no pinned memory
            self._error = error

    def save(self, state: TrainerState) -> Path:
        """Write checkpoint-<step>; every rank must call it (save_state and barriers are collective).

        Training is blocked only while save_state runs the parts' saves: tensors copied to CPU memory, small files
        (processors, configs, scheduler) written to `.tmp-checkpoint-<step>`. The parts' writers (gathering shards,
        serialising), flushing to disk, hashing into the manifest and the rename that publishes the folder run in
        a background thread, which then hands the folder to the Hub pusher and prunes. One write is in flight at a
        time: the next save, or `wait()`, first waits for it, so a slow disk holds training back instead of piling
        up copies. Synchronous (`--async_checkpoint false`), all of it happens before save() returns.

        A failed write (disk full, I/O error) on any rank, now or in the background, stops every rank with one
        clear error (at this save, or at the next save or wait), removes the partial folder and leaves the
        previous checkpoint as it was.
        """
        self.wait()
        final = self.output_dir / name_for(state.step)
        tmp = self.output_dir / f"{TMP_PREFIX}{state.step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.run.trainer_state, self._error, self._deferred = state, None, []
        try:
            with self._only_hooks():
                self.accelerator.save_state(str(tmp))
        except Exception as error:  # save_state's own writes failed (torch.save raises RuntimeError on a full disk)
            self._error = error
        self.accelerator.wait_for_everyone()  # save_state has no barrier of its own: all ranks' files are in
        errors = [e for e in gather_object([describe(self._error) if self._error else None]) if e]
        if errors:
            self._fail(state.step, errors[0], tmp)
        background = (self._deferred, tmp, final)
        if self.run.asynchronous:
            self._writer = threading.Thread(target=self._write, args=background, name=f"write-{final.name}")
            self._writer.start()
        else:
            self._write(*background)
            self.wait()  # a failed write stops every rank now
        return final

    @contextmanager
    def _only_hooks(self) -> Iterator[None]:
        """Accelerate's save_state and load_state, shown none of the prepared objects, only run the hooks (and save
        RNG states, deleted on publishing): the parts write and read every file themselves, in the checkpoint's
        own names and formats. Without this, save_state writes the model, optimizer, schedule and scaler under its
        names (under FSDP gathering them in the foreground, with no option to leave any out) and load_state reads
        them back. Accelerate has no public switch for it: `_models`, `_optimizers`, `_schedulers` and `scaler`
        are what both read."""
        accelerator = self.accelerator
        kept = accelerator._models, accelerator._optimizers, accelerator._schedulers, accelerator.scaler
        accelerator._models, accelerator._optimizers, accelerator._schedulers, accelerator.scaler = [], [], [], None
        try:
            yield
        finally:
            accelerator._models, accelerator._optimizers, accelerator._schedulers, accelerator.scaler = kept

    def save_unless_saved(self, state: TrainerState) -> Path:
        """The checkpoint of `state.step`, written now unless it already is (a preemption right after a save)."""
        self.wait()
        path = self.output_dir / name_for(state.step)
        if not path.is_dir():
            self.save(state)
            self.wait()
        return path

    def wait(self) -> None:
        """Block until the checkpoint in flight is published; every rank must call it. Raises, on every rank,
        the error of a write that failed in the background."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failure, self._background_failure = self._background_failure, None
        failures = [f for f in gather_object([failure]) if f]
        if failures:
            self._fail(*failures[0])

    def _write(self, deferred: list[Deferred], tmp: Path, final: Path) -> None:
        """The background half of a save, on every rank: the parts' collective halves (FSDP's gathers to the main
        process, the sharded checkpoint's write), then their file writes; then the main process publishes. A
        thread's exception would vanish: every rank raises it at the next wait()."""
        try:
            for collective in [d.collective for d in deferred if d.collective is not None]:
                collective()
            for write in [d.write for d in deferred if d.write is not None]:
                write()
            if self.accelerator.is_main_process:
                self._finalize(tmp, final)
        except Exception as error:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            self._background_failure = (step_from_name(final), describe(error))
            return
        if self.accelerator.is_main_process:
            self._after_publish(final)

    def _after_publish(self, final: Path) -> None:
        log.info("Saved %s", final)
        try:
            if self.pusher is not None:
                self.pusher.submit(final, step_from_name(final))
            if self.cfg.save_total_limit:
                self.prune(self.cfg.save_total_limit)
        except Exception as error:  # a thread's exception would vanish: say it, the checkpoint is safe
            log.warning("After saving %s: %s: %s", final.name, type(error).__name__, error)

    def _fail(self, step: int, error: str, tmp: Path | None = None) -> NoReturn:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp or self.output_dir / f"{TMP_PREFIX}{step}", ignore_errors=True)
        previous = [p.name for s, p in list_checkpoints(self.output_dir) if s < step]
        raise TrainError(
            f"Writing {name_for(step)} failed ({error}); training stops here. "
            + (f"The previous checkpoint, {previous[-1]}, is intact: " if previous else "")
            + "fix the cause (e.g. free disk space) and rerun with --resume_from_checkpoint latest."
        )

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Accelerate's RNG files dropped, the manifest last, then the rename that publishes the folder."""
        for path in tmp.iterdir():
            if fnmatch.fnmatch(path.name, ACCELERATE_RNG_FILES):
                path.unlink()
        write_manifest(tmp)
        if final.exists():  # a corrupt or abandoned checkpoint of the same step: replaced only now
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(self.output_dir)

    def prune(self, keep: int) -> None:
        """--save_total_limit: delete all but the newest `keep` checkpoints, sparing the one resumed from and
        those still uploading."""
        for _, path in list_checkpoints(self.output_dir)[:-keep]:
            if path == self.resumed_from or (self.pusher is not None and self.pusher.is_uploading(path)):
                log.info("Keeping %s beyond --save_total_limit: it is being uploaded or was resumed from", path.name)
            else:
                shutil.rmtree(path)
