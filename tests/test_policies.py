"""Policies beyond ACT train and resume bit for bit through the trainer, as users run it.

Each test: N steps straight == K steps, stop, `--resume_from_checkpoint latest` to N (every step's loss, the final
weights and the optimizer state). Tiny configs, offline: Diffusion and VQ-BeT on a one-camera copy of the demo
dataset (VQ-BeT takes a single camera), SmolVLA on the demo dataset and a stand-in VLM built here
(tests/stand_ins.py). The "pretrained" SmolVLA stand-in loads with lerobot's own APIs from a folder and from a
local Hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import stand_ins
import torch
from conftest import EPISODES, assert_ok, base_args, losses, run_cli, same_weights
from hub_server import HubServer

from accel_train import demo_dataset

DIFFUSION = [
    "--policy.type=diffusion",
    "--policy.pretrained_backbone_weights=null",
    "--policy.n_obs_steps=2",
    "--policy.horizon=8",
    "--policy.n_action_steps=4",
    "--policy.drop_n_last_frames=3",
    "--policy.down_dims=[32,64]",
    "--policy.diffusion_step_embed_dim=32",
    "--policy.spatial_softmax_num_keypoints=8",
    "--policy.num_train_timesteps=20",
    "--policy.use_group_norm=true",
    "--policy.crop_shape=[56,56]",  # random crops, drawn from the seeded step RNG
    "--policy.use_separate_rgb_encoder_per_camera=false",
]
VQBET_PHASE_1_STEPS = 3  # the residual VQ-VAE trains for this many steps, then the GPT and heads
VQBET = [
    "--policy.type=vqbet",
    "--policy.pretrained_backbone_weights=null",
    "--policy.n_obs_steps=2",
    "--policy.n_action_pred_token=2",
    "--policy.action_chunk_size=3",
    "--policy.crop_shape=[56,56]",
    "--policy.use_group_norm=true",
    "--policy.spatial_softmax_num_keypoints=8",
    f"--policy.n_vqvae_training_steps={VQBET_PHASE_1_STEPS}",
    "--policy.vqvae_n_embed=8",
    "--policy.vqvae_embedding_dim=16",
    "--policy.vqvae_enc_hidden_dim=32",
    "--policy.gpt_block_size=20",
    "--policy.gpt_input_dim=32",
    "--policy.gpt_output_dim=32",
    "--policy.gpt_n_layer=1",
    "--policy.gpt_n_head=2",
    "--policy.gpt_hidden_dim=32",
    # Warm-up outlasts the run: its LR does not depend on --steps, so the K-step and the N-step runs share it.
    "--policy.scheduler_warmup_steps=10",
]


def smolvla(vlm: Path) -> list[str]:
    return [
        "--policy.type=smolvla",
        f"--policy.vlm_model_name={vlm}",
        "--policy.load_vlm_weights=false",
        f"--policy.resize_imgs_with_padding=[{stand_ins.IMAGE_SIZE},{stand_ins.IMAGE_SIZE}]",
        "--policy.chunk_size=5",
        "--policy.n_action_steps=5",
        # A schedule that --steps does not rescale (its decay ends before K), so that the K-step run and
        # the N-step run follow the same one.
        "--policy.scheduler_warmup_steps=2",
        "--policy.scheduler_decay_steps=4",
    ]


@pytest.fixture(scope="session")
def one_camera_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset with its front camera only."""
    root = demo_dataset.create(
        tmp_path_factory.mktemp("data") / "one_camera", episodes=EPISODES, seed=0, cameras=["front"]
    )
    features = json.loads((root / "meta" / "info.json").read_text())["features"]
    assert [k for k in features if k.startswith("observation.images")] == ["observation.images.front"]
    return root


@pytest.fixture(scope="session")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stand_ins.smolvlm(tmp_path_factory.mktemp("stand_ins") / "smolvlm")


def run_straight(dataset: Path, out: Path, policy: list[str], steps: int) -> Path:
    assert_ok(run_cli(base_args(dataset, out, "--steps", str(steps), *policy)))
    assert [step for step, _ in losses(out)] == list(range(1, steps + 1))
    return out


def assert_resumes_exactly(dataset: Path, straight: Path, out: Path, policy: list[str], k: int, n: int) -> str:
    """K steps, then resume to N: the same run as `straight` (N steps), step for step. Returns the resume's log."""
    args = [*policy, "--save_freq", str(k), "--resume_from_checkpoint", "latest"]
    assert_ok(run_cli(base_args(dataset, out, "--steps", str(k), *args)))
    resumed = run_cli(base_args(dataset, out, "--steps", str(n), *args))
    assert_ok(resumed)
    assert f"Resumed from {out / f'checkpoint-{k}'} at step {k}" in resumed.stderr
    assert losses(out) == losses(straight)
    assert same_weights(out / "model.safetensors", straight / "model.safetensors")
    ours = torch.load(out / f"checkpoint-{n}" / "optimizer_state.pth", weights_only=True)
    theirs = torch.load(straight / f"checkpoint-{n}" / "optimizer_state.pth", weights_only=True)
    assert ours["state"].keys() == theirs["state"].keys()
    for key, state in theirs["state"].items():
        assert all(torch.equal(ours["state"][key][name], value) for name, value in state.items())
    return resumed.stderr


def test_diffusion_resumes_bit_identically(one_camera_dataset: Path, tmp_path: Path) -> None:
    """The denoising noise, timesteps and random crops are drawn in the seeded step."""
    straight = run_straight(one_camera_dataset, tmp_path / "straight", DIFFUSION, 6)
    assert_resumes_exactly(one_camera_dataset, straight, tmp_path / "run", DIFFUSION, k=4, n=6)


@pytest.fixture(scope="module")
def vqbet_straight(one_camera_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_straight(one_camera_dataset, tmp_path_factory.mktemp("vqbet") / "straight", VQBET, 8)


def test_vqbet_resumes_bit_identically(one_camera_dataset: Path, vqbet_straight: Path, tmp_path: Path) -> None:
    """Resumed at step 2, inside the VQ-VAE phase: its step count (VqVae.optimized_steps, outside the state dict)
    continues from the checkpoint, so the phase ends at the same step as in the straight run."""
    assert_resumes_exactly(one_camera_dataset, vqbet_straight, tmp_path / "run", VQBET, k=2, n=8)


def test_smolvla_stand_in_trains_and_resumes_bit_identically(tiny_dataset: Path, vlm: Path, tmp_path: Path) -> None:
    """K=11 lies in the second epoch (10 steps of 8 samples per epoch)."""
    straight = run_straight(tiny_dataset, tmp_path / "straight", smolvla(vlm), 14)
    log = assert_resumes_exactly(tiny_dataset, straight, tmp_path / "run", smolvla(vlm), k=11, n=14)
    assert "(epoch 1, sample 8)" in log


@pytest.fixture(params=["folder", "hub"])
def smolvla_source(request: pytest.FixtureRequest, vlm: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The pretrained stand-in as a folder, or as a repo of the tests' local Hub whose config names its VLM by
    another repo's id (as lerobot/smolvla_base does), both fetched into an empty cache. Yields (name, folder)."""
    if request.param == "folder":
        folder = stand_ins.smolvla_policy(tmp_path / "smolvla", vlm)
        yield str(folder), folder
        return
    vlm_repo, policy_repo = "test-user/smolvlm-stand-in", "test-user/smolvla-stand-in"
    folder = stand_ins.smolvla_policy(tmp_path / "smolvla", vlm, vlm_name=vlm_repo)
    with HubServer() as hub, pytest.MonkeyPatch.context() as patch:
        api = huggingface_hub.HfApi(endpoint=hub.url, token=hub.token)
        for repo_id, local in ((vlm_repo, vlm), (policy_repo, folder)):
            api.create_repo(repo_id)
            api.upload_folder(folder_path=local, repo_id=repo_id)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        yield policy_repo, folder
    assert (tmp_path / "cache" / "models--test-user--smolvlm-stand-in").is_dir()


def test_smolvla_pretrained_stand_in_loads_with_lerobot(smolvla_source: tuple[str, Path], tiny_dataset: Path) -> None:
    """The stand-in is a lerobot pretrained policy: from_pretrained restores its weights, its processors load
    from the same place, and together they turn a dataset frame into an action of the robot's size."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from safetensors.torch import load_file

    source, folder = smolvla_source
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
    }
    policy = SmolVLAPolicy.from_pretrained(source)
    saved = load_file(folder / "model.safetensors")
    loaded = policy.state_dict()
    assert saved.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=source)
    frame = LeRobotDataset(demo_dataset.REPO_ID, root=tiny_dataset, video_backend="pyav")[3]
    batch = {k: v for k, v in frame.items() if k in policy.config.input_features or k == "task"}
    policy.eval()
    with torch.no_grad():
        action = postprocessor(policy.select_action(preprocessor(batch)))
    assert action.shape == (1, 7) and torch.isfinite(action).all()
