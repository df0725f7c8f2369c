"""Bad input: one readable paragraph, a non-zero exit, and nothing in the output dir touched."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, base_args

from accel_train.train import main


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def checkpoint(trained: Path, tmp_path: Path) -> Path:
    """A private copy of checkpoint-3 to damage."""
    out = tmp_path / "out"
    out.mkdir()
    return Path(shutil.copytree(trained / "checkpoint-3", out / "checkpoint-3"))


def fails(capsys: pytest.CaptureFixture, args: list[str], *expected: str, code: int = 1) -> str:
    """Run the CLI in-process; it must exit with `code` and print one paragraph naming `expected`."""
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    message = err[-1]
    assert message.startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    for text in expected:
        assert text in message, message
    return message


def resume_args(tiny_dataset: Path, checkpoint: Path, *extra: str) -> list[str]:
    return base_args(
        tiny_dataset, checkpoint.parent, "--steps", "6", "--resume_from_checkpoint", str(checkpoint), *extra
    )


def test_checkpoint_path_missing(capsys, tiny_dataset: Path, tmp_path: Path) -> None:
    fails(capsys, resume_args(tiny_dataset, tmp_path / "checkpoint-5000"), "checkpoint-5000 does not exist")


@pytest.mark.parametrize("name", ["policy.safetensors", "optimizer_state.pth"])
def test_checkpoint_missing_a_file(capsys, tiny_dataset: Path, checkpoint: Path, name: str) -> None:
    (checkpoint / name).unlink()
    before = snapshot(checkpoint.parent)
    fails(capsys, resume_args(tiny_dataset, checkpoint), f"is missing {name}")
    assert snapshot(checkpoint.parent) == before


def test_truncated_policy_is_caught_by_the_manifest(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    weights = checkpoint / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(checkpoint.parent)
    fails(capsys, resume_args(tiny_dataset, checkpoint), "is corrupted", "policy.safetensors has 1000 bytes")
    assert snapshot(checkpoint.parent) == before


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file", b"\x00" * 64])
def test_policy_not_safetensors(capsys, tiny_dataset: Path, checkpoint: Path, content: bytes) -> None:
    (checkpoint / "manifest.json").unlink()  # a checkpoint from another tool: no manifest to catch it
    (checkpoint / "policy.safetensors").write_bytes(content)
    fails(capsys, resume_args(tiny_dataset, checkpoint), "policy.safetensors is not a valid safetensors file")


def test_other_policy_type(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    fails(capsys, resume_args(tiny_dataset, checkpoint, "--policy.type=diffusion"), "holds a 'act' policy", "diffusion")


def test_other_architecture(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    fails(capsys, resume_args(tiny_dataset, checkpoint, "--policy.dim_model=48"), "another architecture")


def test_feature_shapes_unlike_the_dataset(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    (checkpoint / "manifest.json").unlink()
    for name in ("train_config.json",):
        config = json.loads((checkpoint / name).read_text())
        config["policy"]["input_features"]["observation.state"]["shape"] = [14]
        (checkpoint / name).write_text(json.dumps(config))
    fails(capsys, resume_args(tiny_dataset, checkpoint), "'observation.state' of shape (14,)", "has shape (7,)")


def test_folder_name_without_step_and_no_state(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    (checkpoint / "manifest.json").unlink()
    (checkpoint / "trainer_state.json").unlink()
    renamed = checkpoint.rename(checkpoint.parent / "my-best-model")
    fails(capsys, resume_args(tiny_dataset, renamed), "Cannot tell which step", "checkpoint-<step>")


def test_renamed_folder_takes_the_step_from_its_state(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    renamed = checkpoint.rename(checkpoint.parent / "my-best-model")
    # Continues at step 3 from the state file; --steps 3 is then not above it.
    fails(capsys, resume_args(tiny_dataset, renamed, "--steps", "3"), "not above the step of my-best-model (3)")


def test_folder_name_and_state_disagree(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    renamed = checkpoint.rename(checkpoint.parent / "checkpoint-99")
    fails(capsys, resume_args(tiny_dataset, renamed, "--steps", "200"), "says step 99", "says step 3")


def test_steps_not_above_resume_step(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    fails(capsys, resume_args(tiny_dataset, checkpoint, "--steps", "2"), "--steps 2 is not above", "(3)")


def test_dataset_not_available_offline(capsys, tmp_path: Path) -> None:
    args = ["--output_dir", str(tmp_path / "out"), "--dataset_id", "nobody/no_such_dataset"]
    fails(capsys, args, "nobody/no_such_dataset", "--dataset_root", "accel_train.demo_dataset")


def test_unknown_policy_type(capsys, tmp_path: Path) -> None:
    message = fails(capsys, ["--output_dir", str(tmp_path), "--policy.type=nope"], "nope", code=2)
    assert "act" in message and "diffusion" in message  # lists the known ones


def test_unknown_flag(capsys, tmp_path: Path) -> None:
    fails(capsys, ["--output_dir", str(tmp_path), "--stepz", "5"], "Unknown option --stepz", code=2)
    fails(capsys, ["--output_dir", str(tmp_path), "--policy.dim_modle=3"], "dim_modle", code=2)


def test_fresh_run_into_existing_checkpoints(capsys, tiny_dataset: Path, checkpoint: Path) -> None:
    before = snapshot(checkpoint.parent)
    fails(capsys, base_args(tiny_dataset, checkpoint.parent, "--steps", "6"), "--resume_from_checkpoint latest")
    assert snapshot(checkpoint.parent) == before


def test_malicious_optimizer_pickle_is_refused(capsys, tiny_dataset: Path, checkpoint: Path, tmp_path: Path) -> None:
    """A pickle that would create a file when unpickled: it is refused and the file never appears."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (checkpoint / "manifest.json").unlink()
    (checkpoint / "optimizer_state.pth").write_bytes(pickle.dumps({"state": Exploit()}))
    fails(capsys, resume_args(tiny_dataset, checkpoint), "Refusing to load", "optimizer_state.pth")
    assert not marker.exists()


def test_a_policy_whose_packages_are_missing_names_our_extra(tiny_dataset: Path, tmp_path: Path) -> None:
    """Diffusion without diffusers (hidden from this process): the error names `pip install -e '.[diffusion]'`."""
    args = base_args(tiny_dataset, tmp_path / "out", "--policy.type=diffusion", "--steps", "1")
    code = (
        "import sys; sys.modules['diffusers'] = None; from accel_train.train import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "The 'diffusion' policy needs packages" in last and "pip install -e '.[diffusion]'" in last, last
