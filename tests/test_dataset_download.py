"""A dataset on the Hub, downloaded with the real huggingface_hub client (the local test Hub of conftest's
`served_dataset`) into an empty cache, loads as the copy that was pushed, at the revision asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ServedDataset
from huggingface_hub import HfApi

from accel_train import demo_dataset

SAME = ("data/chunk-000/file-000.parquet", "videos/observation.images.front/chunk-000/file-000.mp4")


def test_download_pinned_to_a_revision(served_dataset: ServedDataset, tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    served = served_dataset
    info = json.loads((served.root / "meta" / "info.json").read_text())
    moved_on = json.dumps({**info, "fps": 99}).encode()  # main moves on after the tagged commit
    HfApi().upload_file(
        path_or_fileobj=moved_on, path_in_repo="meta/info.json", repo_id=served.repo_id, repo_type="dataset"
    )

    copy = tmp_path / "copy"
    dataset = LeRobotDataset(served.repo_id, root=copy, revision=served.revision, video_backend="pyav")
    local = LeRobotDataset(demo_dataset.REPO_ID, root=served.root, video_backend="pyav")
    assert dataset.meta.fps == 10 and dataset.num_episodes == 2 and dataset.num_frames == 80
    for path in SAME:
        assert (copy / path).read_bytes() == (served.root / path).read_bytes(), path
    for i in (0, 47):
        for key in ("observation.state", "action", "observation.images.front", "observation.images.gripper"):
            assert torch.equal(dataset[i][key], local[i][key]), key

    # Without root and revision, as lerobot-train without --dataset.root: the codebase_version tag, into the
    # snapshot cache under HF_LEROBOT_HOME, in a process of its own.
    code = (
        "import sys; from lerobot.datasets.lerobot_dataset import LeRobotDataset as D; "
        "d = D(sys.argv[1], video_backend='pyav'); print(d.root, d.revision, d.meta.fps, d.num_frames, "
        "d[79]['observation.images.right'].shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, served.repo_id], env=served.env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    root, revision, *rest = result.stdout.strip().split(maxsplit=2)
    assert Path(root).is_relative_to(Path(served.env["HF_LEROBOT_HOME"]) / "hub")
    assert (revision, rest) == ("v3.0", ["10 80 torch.Size([3, 64, 64])"])
    assert [b.target_commit for b in HfApi().list_repo_refs(served.repo_id, repo_type="dataset").tags] == [
        served.revision
    ]


def test_train_on_some_episodes_of_a_hub_dataset_at_a_revision(served_dataset: ServedDataset, tmp_path: Path) -> None:
    """lerobot-train's --dataset.repo_id/--dataset.revision/--dataset.episodes against the Hub: only episode 1
    of the tagged revision trains; a revision the repo lacks is one clear error."""
    from conftest import assert_ok, base_args, run_cli

    served, copy = served_dataset, tmp_path / "copy"
    hub = ["--dataset.repo_id", served.repo_id, "--dataset.revision", served.revision]
    result = run_cli(base_args(copy, tmp_path / "out", *hub, "--dataset.episodes=[1]", "--steps", "2"), env=served.env)
    assert_ok(result)
    assert f"Dataset {served.repo_id}: 40 frames, 1 episodes" in result.stderr

    missing = run_cli(base_args(tmp_path / "other", tmp_path / "out2", *hub[:2], "--dataset.revision", "nope",
                                "--steps", "1"), env=served.env)  # fmt: skip
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"The dataset '{served.repo_id}' has no revision 'nope'" in missing.stderr.strip().splitlines()[-1]


def streamed_args(served: ServedDataset, output_dir: Path, *extra: str) -> list[str]:
    """base_args reading the served dataset from the test Hub, streamed (no root: neither the flag nor the demo
    config's)."""
    from conftest import base_args
    from test_datasets import without_root

    args = without_root(base_args(served.root, output_dir, "--dataset.root=null", *extra))
    return [*args, "--dataset.repo_id", served.repo_id, "--dataset.streaming=true"]


def test_a_streamed_run_is_the_local_run_and_resumes_exactly(
    served_dataset: ServedDataset, straight: Path, tmp_path: Path
) -> None:
    """--dataset.streaming=true against the test Hub, with 2 loader workers and augmentation: 10 steps, then a
    resume to 16 in a fresh process (after the dataset's tag has moved on), give the losses and weights of the
    16-step run on the local copy (conftest's `straight`, no workers). The checkpoint records the commit read; no
    data or video file lands on disk."""
    from conftest import STRAIGHT_STEPS, assert_ok, losses, run_cli, same_weights

    served, out = served_dataset, tmp_path / "out"
    common = ["--num_workers", "2", "--image_transforms.enable=true"]
    first = run_cli(streamed_args(served, out, *common, "--steps", "10", "--save_freq", "10"), env=served.env)
    assert_ok(first)
    assert f"(streamed at commit {served.revision[:12]})" in first.stderr
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["datasets"][0]["commit"] == served.revision

    # The dataset moves on: its tag now names a commit whose actions differ. The resume reads the commit its
    # checkpoint recorded.
    import pandas as pd

    data = pd.read_parquet(served.root / "data" / "chunk-000" / "file-000.parquet")
    data["action"] = [action + 1.0 for action in data["action"]]
    data.to_parquet(tmp_path / "moved.parquet")
    api = HfApi()
    moved = api.upload_file(path_or_fileobj=str(tmp_path / "moved.parquet"), repo_id=served.repo_id,
                            path_in_repo="data/chunk-000/file-000.parquet", repo_type="dataset").oid  # fmt: skip
    api.delete_tag(served.repo_id, tag="v3.0", repo_type="dataset")
    api.create_tag(served.repo_id, tag="v3.0", revision=moved, repo_type="dataset")

    resume = ["--resume_from_checkpoint", "latest", "--steps", str(STRAIGHT_STEPS)]
    second = run_cli(streamed_args(served, out, *common, *resume), env=served.env)
    assert_ok(second)
    assert f"at commit {served.revision}, as the checkpoint did" in second.stderr
    assert "no longer bit-identical" not in second.stderr
    assert losses(out) == losses(straight) and len(losses(out)) == STRAIGHT_STEPS
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")

    home = Path(served.env["HF_HOME"])
    downloaded = [p.relative_to(home) for p in home.rglob("*") if p.suffix in (".mp4", ".parquet")]
    assert all("meta" in p.parts for p in downloaded), downloaded


def test_a_stream_that_cannot_be_read_stops_with_one_message(served_dataset: ServedDataset, tmp_path: Path) -> None:
    """Every video read fails (a file gone from the Hub, in the loader worker): one paragraph naming the file and
    the dataset, and how to continue; no traceback."""
    from conftest import run_cli

    served = served_dataset
    served.hub.fail_next(n=10**6, status=404, match="/videos/observation")  # gone: not retried
    result = run_cli(streamed_args(served, tmp_path / "out", "--num_workers", "1", "--steps", "2"), env=served.env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"of the streamed dataset '{served.repo_id}' failed (" in last and "--resume_from_checkpoint" in last


PIN_ON_EVERY_RANK = """
import os, sys
from accelerate import Accelerator
import accel_train.data as data
from accel_train.config import parse

if os.environ["RANK"] != "0":  # only the main process may resolve the revision
    data.at_commit = lambda source: sys.exit("rank %s resolved the revision itself" % os.environ["RANK"])
accelerator = Accelerator(cpu=True)
reads = data.sources_to_read(parse(sys.argv[1:]), accelerator, None)
print("rank", accelerator.process_index, reads[0].revision, flush=True)
"""


def test_every_process_streams_the_commit_the_main_process_resolved(
    served_dataset: ServedDataset, tmp_path: Path
) -> None:
    from conftest import REPO
    from test_datasets import TORCHRUN

    served, script = served_dataset, tmp_path / "pin.py"
    script.write_text(PIN_ON_EVERY_RANK)
    command = [*TORCHRUN, str(script), *streamed_args(served, tmp_path / "out")]
    result = subprocess.run(command, env=served.env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert ranks == [f"rank 0 {served.revision}", f"rank 1 {served.revision}"]
