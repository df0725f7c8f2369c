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
