"""pi0 offline: its processors take the PaliGemma tokenizer from a tiny stand-in served by the test Hub under the
repo id they load (`google/paligemma-3b-pt-224`); training it needs a GPU, because its smallest configuration
has 4B parameters (docs/notes-pi0.md), so that test runs with `pytest -m slow` where CUDA is (scripts/gpu_check.sh).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import stand_ins
import torch
from conftest import assert_ok, losses, run_cli
from hub_server import HubServer


@pytest.fixture
def paligemma(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a process whose huggingface_hub finds the stand-in tokenizer as PaliGemma's."""
    from huggingface_hub import HfApi

    folder = stand_ins.paligemma_tokenizer(tmp_path / "tokenizer")
    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token=hub.token)
        api.create_repo(stand_ins.PALIGEMMA)
        api.upload_folder(repo_id=stand_ins.PALIGEMMA, folder_path=folder)
        yield {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "home")}


PROCESS_ONE_FRAME = """
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies import make_pre_post_processors
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.utils.feature_utils import dataset_to_policy_features

dataset = LeRobotDataset("local/piper_demo", root=sys.argv[1], video_backend="pyav")
features = dataset_to_policy_features(dataset.meta.features)
config = PI0Config(device="cpu")
config.output_features = {k: f for k, f in features.items() if k == "action"}
config.input_features = {k: f for k, f in features.items() if k != "action"}
preprocessor, _ = make_pre_post_processors(config, dataset_stats=dataset.meta.stats)
batch = preprocessor(dataset[0])
tokens, mask = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
print(*tokens.shape, int(mask.sum()), int(tokens.max()))
"""


def test_pi0_processors_tokenize_with_the_served_stand_in(paligemma: dict[str, str], tiny_dataset: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROCESS_ONE_FRAME, str(tiny_dataset)], env=paligemma,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    batch, length, used, largest = map(int, result.stdout.split())
    assert (batch, length) == (1, 48) and 0 < used < 48 and largest < 257152  # padded to pi0's 48; ids it embeds


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pi0 has 4B parameters: a GPU check")
def test_pi0_trains_and_resumes_on_a_gpu(paligemma: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """pi0 (default variants) in bf16 on the demo dataset: 3 steps straight, and 2 steps + resume to 3. The losses
    are finite, the resumed run continues at step 3; how close its loss is to the straight run's is printed
    (GPU kernels need not be bit-reproducible)."""
    common = [
        "--dataset.repo_id", "local/piper_demo", "--dataset.root", str(tiny_dataset), "--demo_dataset=false",
        "--policy.type", "pi0", "--batch_size", "2", "--mixed_precision", "bf16", "--num_workers", "2",
        "--log_freq", "1", "--val_episodes", "0", "--save_freq", "2",
    ]  # fmt: skip
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert_ok(run_cli([*common, "--output_dir", str(straight), "--steps", "3"], env=paligemma, timeout=900))
    assert_ok(run_cli([*common, "--output_dir", str(out), "--steps", "2"], env=paligemma, timeout=900))
    resumed = run_cli([*common, "--output_dir", str(out), "--steps", "3", "--resume_from_checkpoint", "latest"],
                      env=paligemma, timeout=900)  # fmt: skip
    assert_ok(resumed)
    assert "Resumed from" in resumed.stderr and [s for s, _ in losses(out)] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in losses(straight) + losses(out))
    gaps = [abs(a - b) for (_, a), (_, b) in zip(losses(straight), losses(out), strict=True)]
    print(f"pi0 bf16 losses straight {losses(straight)}, resumed {losses(out)}, largest gap {max(gaps):.3g}")
