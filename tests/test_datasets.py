"""lerobot-train's dataset options, and several datasets in one run: a subset of episodes, lists of datasets in
flags, dataset entries (own root, episodes, weight, rename_map) in a config file, exact resume on 2 processes,
the mix recorded in the checkpoint, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, assert_ok, base_args, free_port, losses, run_cli, same_weights
from lerobot.datasets.sampler import EpisodeAwareSampler

from accel_train import demo_dataset
from accel_train.checkpoint import TrainerState
from accel_train.config import parse
from accel_train.data import DataPosition, TrainingData
from accel_train.errors import UsageError
from accel_train.mix import EpisodeOrder, MixedOrder, epoch_counts
from accel_train.resume import starting_state
from accel_train.train import main

# A port free now, not torchrun's default 29500, which another run on the machine may hold.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


@pytest.fixture(scope="module")
def wrist_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another session, recorded differently: 3 episodes, PNG images, the gripper camera named 'wrist'."""
    root = tmp_path_factory.mktemp("data") / "wrist"
    return demo_dataset.create(root, episodes=3, seed=1, cameras=("front", "right", "wrist"), images=True, frames=24)


def order(lengths: list[int], seed: int) -> EpisodeOrder:
    ends = [sum(lengths[: i + 1]) for i in range(len(lengths))]
    return EpisodeOrder(EpisodeAwareSampler([0, *ends[:-1]], ends, shuffle=True, seed=seed))


def test_a_mix_epoch_is_a_pure_function_of_seed_and_epoch_and_weights_set_the_shares() -> None:
    small, large = order([5, 5], 1), order([30, 30], 2)  # 10 and 60 frames
    counts = epoch_counts([len(small), len(large)], [1.0, 1.0])
    assert counts == [35, 35]  # equal weights: half of the 70 samples of an epoch each
    mix = MixedOrder([small, large], [0, 10], counts, seed=7)
    again = MixedOrder([order([5, 5], 1), order([30, 30], 2)], [0, 10], counts, seed=7)
    assert mix.frames(3) == again.frames(3) and mix.frames(3) != mix.frames(4)
    first = mix.frames(0)
    assert len(first) == 70 and sum(f < 10 for f in first) == 35
    # The small dataset comes round 3.5 times an epoch, every frame in turn; the large one half-way.
    seen = Counter(f for f in first if f < 10)
    assert sorted(seen) == list(range(10)) and sorted(seen.values()) == [3] * 5 + [4] * 5
    assert len({f for e in (0, 1) for f in mix.frames(e) if f >= 10}) == 60
    assert epoch_counts([10, 60], [None, None]) == [10, 60]  # no weights: each in proportion to its frames


def test_a_subset_of_episodes_trains_on_those_frames_only(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = parse(base_args(tiny_dataset, tmp_path / "out", "--dataset.episodes=[1]"))
    cfg.policy.device = "cpu"
    data = TrainingData.load(cfg)
    assert len(data.dataset) == 40 and data.dataset.episodes == [1]
    frames = data.order.frames(0)
    assert {int(data.dataset[i]["episode_index"]) for i in frames[:: len(frames) // 4]} == {1}
    assert main(base_args(tiny_dataset, tmp_path / "out", "--dataset.episodes=[1]", "--steps", "2")) == 0


def without_root(args: list[str]) -> list[str]:
    """base_args without its --dataset_root, for flags that give the roots in the section's spelling."""
    at = args.index("--dataset_root")
    return args[:at] + args[at + 2 :]


def write_mix_config(path: Path, tiny: Path, wrist: Path) -> Path:
    """The demo config with its dataset replaced by two entries: the tiny dataset at weight 2, and episodes 0 and
    2 of the wrist one at weight 1, its wrist camera renamed to the demo's gripper camera."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["demo_dataset"] = False
    config["dataset"] = [
        {"repo_id": "local/piper_demo", "root": str(tiny), "weight": 2.0},
        {"repo_id": "local/piper_demo", "root": str(wrist), "episodes": [0, 2], "weight": 1.0,
         "rename_map": {"observation.images.wrist": "observation.images.gripper"}},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def mix_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--batch_size", "4", "--log_freq", "1",
            "--num_workers", "0", "--val_episodes", "0", *extra]  # fmt: skip


def test_two_datasets_resume_exactly_on_two_processes(tiny_dataset: Path, wrist_dataset: Path, tmp_path: Path) -> None:
    """Entries with their own root, episodes, weight and camera rename: 6 steps straight on 2 processes ==
    5 steps + resume to 6, bit for bit; the checkpoint records the mix."""
    config = write_mix_config(tmp_path / "mix.yaml", tiny_dataset, wrist_dataset)
    common = ["--save_freq", "5", "--image_transforms.enable=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_cli(mix_args(config, straight, "--steps", "6", *common), TORCHRUN)
    assert_ok(first)
    assert "Dataset local/piper_demo + local/piper_demo: 128 frames" in first.stderr  # 80 + 2 episodes of 24
    assert "WARNING" not in first.stderr
    assert_ok(run_cli(mix_args(config, resumed, "--steps", "5", *common), TORCHRUN))
    second = run_cli(mix_args(config, resumed, "--steps", "6", *common, "--resume_from_checkpoint", "latest"),
                     TORCHRUN)  # fmt: skip
    assert_ok(second)
    assert "mix" not in second.stderr and "no longer bit-identical" not in second.stderr
    assert losses(resumed) == losses(straight)
    assert same_weights(resumed / "model.safetensors", straight / "model.safetensors")
    recorded = json.loads((resumed / "checkpoint-5" / "trainer_state.json").read_text())["datasets"]
    # 2:1 weights over the 80 + 48 usable frames (ACT uses every frame): 85 and 43 samples an epoch.
    assert [(d["root"], d["episodes"], d["epoch_samples"]) for d in recorded] == [
        (str(tiny_dataset), None, 85),
        (str(wrist_dataset), [0, 2], 43),
    ]


def test_datasets_as_flag_lists_and_a_changed_mix_warns(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Parallel lists in flags (the same repo id twice, two roots) with weights; resuming with other weights
    warns that the run is no longer bit-identical, and continues."""
    out, copy = tmp_path / "out", tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    flags = ["--dataset.repo_id=[local/piper_demo,local/piper_demo]", f"--dataset.root=[{tiny_dataset},{copy}]"]
    assert main(without_root(base_args(tiny_dataset, out, *flags, "--dataset.weights=[1,3]", "--steps", "2"))) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [d["epoch_samples"] for d in state["datasets"]] == [40, 120]
    assert main(without_root(base_args(tiny_dataset, out, *flags, "--dataset.weights=[1,1]", "--steps", "3",
                                       "--resume_from_checkpoint", "latest"))) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "Resuming with dataset.weights changed: [1.0, 3.0] -> [1.0, 1.0]" in err
    assert "different dataset mix (local/piper_demo weight 1 [40/epoch] + local/piper_demo weight 3" in err
    assert "no longer bit-identical" in err


def error_of(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), err
    return err[-1]


def test_bad_dataset_options_get_one_clear_error(
    tiny_dataset: Path, wrist_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    two = ["--dataset.repo_id=[local/piper_demo,local/piper_demo]", f"--dataset.root=[{tiny_dataset},{wrist_dataset}]"]
    cases = [
        (["--dataset.episodes=[0,7]"], ["episode(s) 7", "has 2 episodes (0 to 1)"]),
        (["--dataset.episodes=[]"], ["empty list"]),
        ([*two, "--dataset.weights=[1,2,3]"], ["--dataset.weights has 3 values", "names 2 datasets"]),
        ([*two, "--dataset.episodes=[0,1]"], ["one list per dataset"]),
        ([*two], ["datasets of the mix differ", str(wrist_dataset), "observation.images.gripper",
                  "observation.images.wrist"]),
        (["--dataset_id=a/b", "--dataset.repo_id=c/d"], ["--dataset_id=a/b and --dataset.repo_id=c/d are the same "
                                                          "option in two spellings"]),
        (["--dataset.streaming=true", "--frame_cache=disk"], ["--frame_cache disk needs the whole videos",
                                                              "drop one of the two"]),
        (["--dataset.streaming=true", "--dataset.video_backend=torchcodec"], ["decodes with PyAV"]),
        (["--dataset.streaming=true", f"--dataset.root={wrist_dataset}"], ["cannot stream the dataset",
                                                                           "observation.images.wrist"]),
        (["--dataset.streaming=true", "--dataset.root=null", "--dataset.repo_id=nobody/gone"],
         ["Could not load the dataset 'nobody/gone' locally or on the Hugging Face Hub"]),
        (["--dataset.repo_id=[local/piper_demo,nobody/gone]", f"--dataset.root=[{tiny_dataset},{tmp_path / 'no'}]"],
         ["Could not load the dataset 'nobody/gone'", "--dataset.root"]),
    ]  # fmt: skip
    for flags, expected in cases:
        args = base_args(tiny_dataset, out, *flags, "--steps", "1")
        message = error_of(without_root(args) if any("root=" in f for f in flags) else args, capsys)
        assert all(text in message for text in expected), (flags, message)
    assert not out.exists() or not any(out.glob("checkpoint-*"))


def test_a_config_file_mixing_both_spellings_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"dataset_id": "a/b", "dataset": {"repo_id": "c/d"}}))
    with pytest.raises(UsageError, match="sets both dataset_id"):
        parse(["--config", str(config), "--output_dir", str(tmp_path)])


def test_a_mix_of_image_and_video_cameras_gives_one_scale(
    tiny_dataset: Path, wrist_dataset: Path, tmp_path: Path
) -> None:
    """lerobot returns video frames as uint8 and image features as floats in [0, 1]: in a mix, both as floats."""
    cfg = parse(mix_args(write_mix_config(tmp_path / "mix.yaml", tiny_dataset, wrist_dataset), tmp_path / "out"))
    cfg.policy.device = "cpu"
    data = TrainingData.load(cfg)
    for index in (0, len(data.dataset) - 1):  # a video frame of the first dataset, an image of the second
        frame = data.dataset[index]["observation.images.gripper"]
        assert frame.dtype == torch.float32 and 0 <= frame.min() and frame.max() <= 1 and frame.max() > 0.1


def test_a_resume_into_a_smaller_epoch_starts_the_next_one(tmp_path: Path) -> None:
    """The saved position lies beyond the new epoch's end (another mix, a larger step): the next epoch begins."""
    cfg = parse(["--output_dir", str(tmp_path), "--batch_size", "8"])
    saved = TrainerState(step=5, data=DataPosition(epoch=2, sample=40), samples_seen=40, seed=cfg.seed, batch_size=8)
    start = SimpleNamespace(resume=tmp_path, saved=saved, step=5)
    data = SimpleNamespace(epoch_samples=44, describe=list)
    assert starting_state(cfg, 1, start, data).data == DataPosition(epoch=3, sample=0)
    data.epoch_samples = 48
    assert starting_state(cfg, 1, start, data).data == DataPosition(epoch=2, sample=40)
