"""Sharded checkpoints (accel_train.sharded_checkpoint), on CPU with gloo: a small model trained with AdamW
(tests/sharded_checkpoint_worker.py: one weight tied under two names, uneven FSDP shards, a parameter without
optimizer state, a buffer) is saved by 2 processes with FSDP2 and without (a replica in each), and with a LoRA adapter;
loaded by 2, 3 and 1 processes, with FSDP and without, its full state is the saved one bit for bit, and one more
step after a load at the same world size is the step the saving run took. Every load runs with pickle.load(s) and
torch.load(weights_only=False) made to fail. The export writes the consolidated checkpoint's files of the same state.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sharded_checkpoint_worker as worker
import torch
import torch.distributed.checkpoint as dcp
from conftest import free_port
from safetensors import safe_open
from safetensors.torch import save_model

from accel_train import sharded_checkpoint
from accel_train.errors import TrainError
from accel_train.sharded_checkpoint import SHARD_INDEX_FILE, SHARDS_DIR, ShardedState, export_consolidated

WORKER = Path(__file__).with_name("sharded_checkpoint_worker.py")
SAVES = ["save:fsdp:a", "save:plain:b", "save:fsdp+peft:p"]
LOADS_ON_TWO = ["load:fsdp:a", "load:plain:a", "load:fsdp:a-next", "load:fsdp:b", "load:plain:b"]
ADAPTER_LOADS_ON_TWO = ["load:fsdp+peft:p", "load:plain+peft:p"]


def torchrun(processes: int, folder: Path, tasks: list[str]) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(WORKER), str(folder), *tasks]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return result.stdout + result.stderr[-3000:]


def assert_done(output: str, tasks: list[str]) -> None:
    assert not [task for task in tasks if f"ok {task}\n" not in output], output[-5000:]


@pytest.fixture(scope="module")
def on_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The saves and the loads on 2 processes, in one run of 2 processes: (their folder, the run's output)."""
    folder = tmp_path_factory.mktemp("sharded")
    return folder, torchrun(2, folder, SAVES + LOADS_ON_TWO + ADAPTER_LOADS_ON_TWO)


def test_fsdp_and_plain_saves_load_on_two_either_way_and_the_next_step_is_exact(on_two: tuple[Path, str]) -> None:
    _, output = on_two
    # load:fsdp:a and load:plain:b also train the next step; a-next was staged into the buffers of the first save.
    assert_done(output, SAVES[:2] + LOADS_ON_TWO)


def test_reshards_from_two_to_three_and_one_and_from_three_to_one(on_two: tuple[Path, str]) -> None:
    folder, _ = on_two
    assert_done(torchrun(3, folder, tasks := ["load:fsdp:a", "load:plain:a", "save:fsdp:c"]), tasks)
    # One process, no process group: from 2 FSDP processes, and from 3 (where one holds no rows of `gain`).
    worker.load(folder, "plain", "a")
    worker.load(folder, "plain", "c")


def data_bytes(path: Path) -> int:
    with safe_open(path, "pt") as file:
        return sum(math.prod(file.get_slice(k).get_shape()) * 4 for k in file.keys())  # float32 only


def test_each_process_writes_about_half(on_two: tuple[Path, str]) -> None:
    folder, _ = on_two
    for name in "ab":  # FSDP: each its shards; plain: each replicated tensor by one process
        shards = sorted((folder / name / SHARDS_DIR).glob("*.safetensors"))
        sizes = [data_bytes(path) for path in shards]
        assert len(sizes) == 2 and all(0.3 < size / sum(sizes) < 0.7 for size in sizes), (name, sizes)


@pytest.mark.parametrize("name", ["a", "b", "p"])  # FSDP with a tied weight, a replica in each process, LoRA
def test_export_writes_the_consolidated_files_of_the_same_state(
    on_two: tuple[Path, str], tmp_path: Path, name: str
) -> None:
    folder, _ = on_two
    out, reference = tmp_path / "export", folder / f"{name}-consolidated"
    export_consolidated(folder / name / SHARDS_DIR, out)
    assert (out / "policy.safetensors").read_bytes() == (reference / "policy.safetensors").read_bytes()
    ours, theirs = (torch.load(p / "optimizer_state.pth", weights_only=True) for p in (out, reference))
    worker.same(theirs, ours)
    with zipfile.ZipFile(out / "optimizer_state.pth") as archive:
        assert archive.testzip() is None  # every record's CRC-32 is right


def test_adapter_checkpoints_hold_the_adapters_and_load_with_fsdp_and_without(on_two: tuple[Path, str]) -> None:
    folder, output = on_two
    assert_done(output, SAVES[2:] + ADAPTER_LOADS_ON_TWO)
    index = sharded_checkpoint.read_index(folder / "p" / SHARDS_DIR)
    assert index["adapter_names"] == {
        "base_model.model.mid.0.lora_A.default.weight": "base_model.model.mid.0.lora_A.weight",
        "base_model.model.mid.0.lora_B.default.weight": "base_model.model.mid.0.lora_B.weight",
        "base_model.model.mid.2.modules_to_save.default.weight": "base_model.model.mid.2.weight",
        "base_model.model.mid.2.modules_to_save.default.bias": "base_model.model.mid.2.bias",
    }
    assert index["model"] == list(index["adapter_names"]) and index["tied"] == {}


def damaged(source: Path, tmp_path: Path, label: str) -> Path:
    copy = tmp_path / label
    shutil.copytree(source, copy)
    return copy


def test_missing_truncated_or_damaged_shards_give_clear_errors(on_two: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = on_two
    net, optimizer = worker.build("plain", seed=1)
    state = ShardedState(net, optimizer, None)
    second = "shard-00002-model-00001-of-00001.safetensors"

    missing = damaged(folder / "a", tmp_path, "missing")
    (missing / SHARDS_DIR / second).unlink()
    truncated = damaged(folder / "a", tmp_path, "truncated")
    with open(truncated / SHARDS_DIR / second, "r+b") as file:
        file.truncate(file.seek(0, 2) - 8)
    garbled = damaged(folder / "a", tmp_path, "garbled")
    with open(garbled / SHARDS_DIR / second, "r+b") as file:
        file.write(b"\xff" * 16)  # the header's length and its start
    unfinished = damaged(folder / "a", tmp_path, "unfinished")
    (unfinished / SHARDS_DIR / SHARD_INDEX_FILE).unlink()
    cases = {missing: "is missing", truncated: "bytes instead of", garbled: "not a readable safetensors file",
             unfinished: "the sharded checkpoint is incomplete"}  # fmt: skip
    for checkpoint, message in cases.items():
        with pytest.raises(TrainError, match=message):
            state.load(checkpoint)
        with pytest.raises(TrainError, match=message):
            export_consolidated(checkpoint / SHARDS_DIR, tmp_path / "export")
    other = torch.nn.Linear(2, 2)  # another architecture
    with pytest.raises(TrainError, match="2 missing policy tensors .* 9 unexpected"):
        ShardedState(other, torch.optim.AdamW(other.parameters()), None).load(folder / "a")
    groups = [{"params": [p]} for p in net.parameters()]  # the same parameters, one group each
    with pytest.raises(TrainError, match="another optimizer setup"):
        ShardedState(net, torch.optim.AdamW(groups), None).load(folder / "a")


def test_a_failed_background_write_raises_at_wait_and_folders_are_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, optimizer = worker.build("plain", seed=0)
    worker.train_step(net, optimizer, 1, "plain")
    state = ShardedState(net, optimizer, None)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", full_disk)
    state.stage_and_save(tmp_path / "failed")  # returns: the write runs in the background
    with pytest.raises(OSError, match="No space left"):
        state.wait()
    monkeypatch.undo()
    state.stage_and_save(tmp_path / "saved", blocking=True)
    with pytest.raises(FileExistsError):
        state.stage_and_save(tmp_path / "saved")


def test_the_unpickling_guard_catches_dcps_default_reader(tmp_path: Path) -> None:
    """The workers' guard is not vacuous: DCP's default format is read with pickle.load, which it stops."""
    dcp.save({"x": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    with worker.no_unpickling(), pytest.raises(AssertionError, match="unpickled"):
        dcp.FileSystemReader(tmp_path).read_metadata()


def test_a_save_before_the_first_step_holds_no_optimizer_state_and_changes_nothing(tmp_path: Path) -> None:
    """torch's get_optimizer_state_dict would create the state with a step at learning rate 0, which Adam counts."""
    net, optimizer = worker.build("plain", seed=0)
    ShardedState(net, optimizer, None).stage_and_save(tmp_path / "step-0", blocking=True)
    assert not optimizer.state
    loaded_net, loaded_optimizer = worker.build("plain", seed=1)
    ShardedState(loaded_net, loaded_optimizer, None).load(tmp_path / "step-0")
    worker.train_step(net, optimizer, 1, "plain")
    worker.train_step(loaded_net, loaded_optimizer, 1, "plain")
    worker.same(net.state_dict(), loaded_net.state_dict())
    worker.same(optimizer.state_dict(), loaded_optimizer.state_dict())


class Mixed(torch.nn.Module):
    """Tensors of every kind a policy file holds: several dtypes, a 0-dim, an empty and a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 2).half()
        self.c = torch.nn.Linear(2, 2).double()
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("größe", torch.ones(1, dtype=torch.int8))  # a name beyond ASCII


def test_the_exported_policy_file_is_save_models_bytes_whatever_the_dtypes(tmp_path: Path) -> None:
    net = Mixed()
    optimizer = torch.optim.AdamW(net.parameters())
    for param in net.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    ShardedState(net, optimizer, None).stage_and_save(tmp_path / "mixed", blocking=True)
    out = tmp_path / "export"
    export_consolidated(tmp_path / "mixed" / SHARDS_DIR, out)
    save_model(net, str(tmp_path / "reference.safetensors"))
    assert (out / "policy.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    worker.same(optimizer.state_dict(), torch.load(out / "optimizer_state.pth", weights_only=True))
