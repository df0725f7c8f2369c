"""Checkpoints pushed to the Hub in the background, and a resume from the Hub on another machine.

The Hub is the local Hub-compatible server of tests/hub_server.py, driven by the real huggingface_hub client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from conftest import REPO, STRAIGHT_STEPS, TRAIN, assert_ok, base_args, same_weights
from hub_server import HubServer

from accel_train import checkpoint as ckpt
from accel_train.train import main

REPO_ID = "test-user/piper-act"


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def machine_env(hub: HubServer, home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a machine with its own empty Hugging Face cache, logged in to the test Hub."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token or hub.token, "HF_HOME": str(home)}


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pointer(hub: HubServer, repo_id: str = REPO_ID) -> dict | None:
    try:
        raw = hub.files(repo_id).get("checkpoints.json")
    except Exception:  # the repo does not exist yet
        return None
    return json.loads(raw) if raw else None


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_and_wait_for_a_push(hub: HubServer, args: list[str], tmp_path: Path) -> subprocess.Popen:
    """Start a pushing run; return once its first checkpoint is complete on the Hub (or the run ended)."""
    run = start(args, machine_env(hub, tmp_path / "home-a"))
    wait_for(lambda: (pointer(hub) or {}).get("latest") is not None or run.poll() is not None)
    return run


def push_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return base_args(
        dataset, out, "--steps", str(STRAIGHT_STEPS), "--image_transforms.enable=true",
        "--push_to_hub=true", "--hub_repo_id", REPO_ID, *extra,
    )  # fmt: skip


def test_killed_run_resumes_from_the_hub_on_another_machine(
    hub: HubServer, straight: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    first = start_and_wait_for_a_push(hub, push_args(tiny_dataset, tmp_path / "a", "--save_freq", "4"), tmp_path)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-run"
    latest = pointer(hub)["latest"]
    step = int(latest.split("-")[1])
    assert step < STRAIGHT_STEPS
    # Each checkpoint landed as one commit holding all of its files; the pointer came in a later commit.
    commits = hub.commits(REPO_ID)
    adds = [c for c in commits if c.summary == f"Add {latest}"]
    assert len(adds) == 1 and {f.split("/")[0] for f in adds[0].added} == {latest}
    assert f"{latest}/policy.safetensors" in adds[0].added and f"{latest}/manifest.json" in adds[0].added
    assert commits.index(adds[0]) < max(i for i, c in enumerate(commits) if "checkpoints.json" in c.added)

    # Another machine: fresh output dir, empty HF cache, resumes from the Hub and pushes on.
    second = start(
        push_args(tiny_dataset, tmp_path / "b", "--save_freq", "4", "--resume_from_checkpoint", f"hf://{REPO_ID}"),
        machine_env(hub, tmp_path / "home-b"),
    )
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    assert f"at step {step} " in stderr and "Fresh start" not in stderr
    assert same_weights(tmp_path / "b" / "model.safetensors", straight / "model.safetensors")
    assert pointer(hub)["latest"] == f"checkpoint-{STRAIGHT_STEPS}"
    assert hub.files(REPO_ID)["model.safetensors"] == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert hub.token not in stderr
    card = huggingface_hub.ModelCard(hub.files(REPO_ID)["README.md"].decode())  # the Hub page says what it is
    assert card.data.library_name == "lerobot" and card.data.datasets == ["local/piper_demo"]
    assert {"robotics", "lerobot", "act"} <= set(card.data.tags)


def test_hub_down_mid_training_then_back(hub: HubServer, tiny_dataset: Path, tmp_path: Path) -> None:
    """Server stopped after the first push: training goes on, uploads retry, and the newest reaches it later."""
    out = tmp_path / "out"
    run = start_and_wait_for_a_push(
        hub, push_args(tiny_dataset, out, "--save_freq", "4", "--hub_retries", "1"), tmp_path
    )
    hub.stop()
    wait_for(lambda: (out / f"checkpoint-{STRAIGHT_STEPS}").is_dir() or run.poll() is not None)
    hub.start()  # same port: the client finds it again
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert "Retrying in" in stderr or "retrying in" in stderr  # the client's retries, or ours
    remote = pointer(hub)
    pushed = sorted(entry["step"] for entry in remote["checkpoints"].values())
    assert f"checkpoints pushed at steps {', '.join(map(str, pushed))};" in stderr and "final model pushed" in stderr
    assert STRAIGHT_STEPS in pushed and len(pushed) < 4  # some never made it while the Hub was down
    for step in (4, 8, 12, 16):
        assert ckpt.verify(out / f"checkpoint-{step}") is None


def test_final_push_failure_is_reported(hub: HubServer, tiny_dataset: Path, tmp_path: Path) -> None:
    """The token stops working mid-run (401): training finishes locally, warns, and exits non-zero."""
    out = tmp_path / "out"
    run = start_and_wait_for_a_push(
        hub, push_args(tiny_dataset, out, "--save_freq", "4", "--hub_retries", "1"), tmp_path
    )
    hub.revoke_token()
    pushed = pointer(hub)["latest"].split("-")[1]
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 1
    assert "giving up on the upload" in stderr and "401" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: Training finished and everything is saved")
    assert f"checkpoints pushed at steps {pushed};" in stderr and "final model FAILED" in stderr
    for step in (4, 8, 12, 16):
        assert ckpt.verify(out / f"checkpoint-{step}") is None
    assert (out / "model.safetensors").is_file() and hub.token not in stderr


def test_uploads_slower_than_checkpoints(hub: HubServer, tiny_dataset: Path, tmp_path: Path) -> None:
    hub.set_delay(1.0, upload=False)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(TRAIN), *push_args(tiny_dataset, out, "--save_freq", "1", "--hub_keep_last", "2",
                                                "--save_total_limit", "2")],
        cwd=REPO, env=machine_env(hub, tmp_path / "home"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert_ok(result)
    summary = next(line for line in result.stderr.splitlines() if "checkpoints pushed at steps" in line)
    pushed = [int(s) for s in summary.split("pushed at steps ")[1].split(";")[0].split(", ")]
    skipped = [int(s) for s in summary.split("skipped (superseded) ")[1].split(";")[0].split(", ")]
    assert skipped and pushed[-1] == STRAIGHT_STEPS and not set(pushed) & set(skipped)
    assert sorted(pushed + skipped) == list(range(1, STRAIGHT_STEPS + 1))
    remote = pointer(hub)
    assert remote["latest"] == f"checkpoint-{STRAIGHT_STEPS}" and len(remote["checkpoints"]) == 2
    folders = {p.split("/")[0] for p in hub.files(REPO_ID) if p.startswith("checkpoint-")}
    assert folders == set(remote["checkpoints"])  # --hub_keep_last 2 removed the older folders
    # --save_total_limit 2 pruned the local ones, but never one still uploading: no upload lost its files.
    assert "failed none" in summary
    local = [step for step, _ in ckpt.list_checkpoints(out)]
    assert local[-2:] == [STRAIGHT_STEPS - 1, STRAIGHT_STEPS] and len(local) <= 3
    assert "it is being uploaded" in result.stderr


@pytest.fixture(scope="module")
def pushed(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A test Hub whose repo holds checkpoint-2 and checkpoint-4; this process's client pointed at it.

    Shared by the tests below; the one that corrupts a file runs last.
    """
    tmp = tmp_path_factory.mktemp("pushed")
    with HubServer() as hub, pytest.MonkeyPatch.context() as patch:
        args = base_args(tiny_dataset, tmp / "out", "--steps", "4", "--save_freq", "2")
        result = subprocess.run(
            [sys.executable, str(TRAIN), *args, "--push_to_hub=true", "--hub_repo_id", REPO_ID],
            cwd=REPO, env=machine_env(hub, tmp / "home"), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert_ok(result)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        patch.setenv("HF_TOKEN", hub.token)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "home-here" / "hub"))
        yield hub


def resume_from(capsys, tiny_dataset: Path, out: Path, spec: str) -> tuple[int, str]:
    code = main(base_args(tiny_dataset, out, "--steps", "6", "--resume_from_checkpoint", spec))
    return code, capsys.readouterr().err


def test_resume_from_an_explicit_hub_checkpoint(pushed: HubServer, capsys, tiny_dataset: Path, tmp_path: Path):
    code, err = resume_from(capsys, tiny_dataset, tmp_path / "out", f"hf://{REPO_ID}/checkpoint-2@main")
    assert code == 0, err
    assert "at step 2 " in err and ckpt.verify(tmp_path / "out" / "checkpoint-2") is None


def test_latest_considers_the_hub(pushed: HubServer, capsys, tiny_dataset: Path, tmp_path: Path):
    """The Hub's newest checkpoint beats an older local one. (The runs above resumed pushing, as their
    checkpoints' config says: the newest on the Hub is whatever they pushed last.)"""
    newest = pointer(pushed)["checkpoints"][pointer(pushed)["latest"]]["step"]
    out = tmp_path / "out"
    assert main(base_args(tiny_dataset, out, "--steps", "1", "--save_freq", "1")) == 0
    args = base_args(tiny_dataset, out, "--steps", "12", "--resume_from_checkpoint", "latest")
    assert main([*args, "--hub_repo_id", REPO_ID]) == 0
    assert f"at step {newest} " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf://test-user/no-such-repo", "was not found"),
        (f"hf://{REPO_ID}/checkpoint-3", "no complete checkpoint named checkpoint-3. Complete checkpoints there: "
                                         "checkpoint-2, checkpoint-4"),
        (f"hf://{REPO_ID}@no-such-branch", "revision 'no-such-branch' does not exist"),
        ("hf://just-a-name", "is not a Hub checkpoint address"),
    ],
)  # fmt: skip
def test_hub_resume_errors(pushed: HubServer, capsys, tiny_dataset: Path, tmp_path: Path, spec: str, expected: str):
    code, err = resume_from(capsys, tiny_dataset, tmp_path / "out", spec)
    assert code == 1 and expected in err.strip().splitlines()[-1], err


def test_invalid_token(pushed: HubServer, capsys, monkeypatch, tiny_dataset: Path, tmp_path: Path):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, err = resume_from(capsys, tiny_dataset, tmp_path / "out", f"hf://{REPO_ID}")
    assert code == 1 and "refused the token" in err and "hf_wrong" not in err


def test_checkpoints_lists_the_hub_repo(pushed: HubServer, capsys) -> None:
    """Listed from the repo's file tree without downloading; a replaced file (on a branch) is flagged."""
    from accel_train.cli import main as cli

    assert cli(["checkpoints", f"hf://{REPO_ID}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # 2 and 4 from the fixture's run; an earlier test's resume may have pushed 6 since.
    assert [r["step"] for r in rows][:2] == [2, 4] and {(r["verified"], r["pushed"]) for r in rows} == {("yes", "yes")}
    assert all(r["size"] > 1_000_000 and 0 <= r["age_s"] < 3600 for r in rows)
    api = huggingface_hub.HfApi(endpoint=pushed.url, token=pushed.token)
    api.create_branch(REPO_ID, branch="replaced")
    api.upload_file(path_or_fileobj=b"not the weights", path_in_repo="checkpoint-2/policy.safetensors",
                    repo_id=REPO_ID, revision="replaced")  # fmt: skip
    assert cli(["checkpoints", f"hf://{REPO_ID}@replaced", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["verified"] for r in rows][:2] == ["NO: policy.safetensors has another size", "yes"]


def test_remote_file_names_cannot_escape_the_checkpoint_folder(
    pushed: HubServer, capsys, tiny_dataset: Path, tmp_path: Path
):
    """A crafted checkpoints.json naming ../../ paths: refused before anything is written outside the folder."""
    api = huggingface_hub.HfApi(endpoint=pushed.url, token=pushed.token)
    evil = {"latest": "checkpoint-7", "checkpoints": {"checkpoint-7": {"step": 7, "files": {
        "../../escaped.txt": {"size": 1, "sha256": "0" * 64}}}}}  # fmt: skip
    api.create_branch(REPO_ID, branch="evil")
    api.upload_file(path_or_fileobj=json.dumps(evil).encode(), path_in_repo="checkpoints.json", repo_id=REPO_ID,
                    revision="evil")  # fmt: skip
    code, err = resume_from(capsys, tiny_dataset, tmp_path / "a" / "out", f"hf://{REPO_ID}@evil")
    assert code == 1 and "'../../escaped.txt', which is not a plain relative path; refused" in err
    assert not list(tmp_path.rglob("escaped.txt"))


def test_corrupted_remote_file_is_never_trained_from(pushed: HubServer, capsys, tiny_dataset: Path, tmp_path: Path):
    pushed.corrupt(REPO_ID, "checkpoint-4/optimizer_state.pth")
    code, err = resume_from(capsys, tiny_dataset, tmp_path / "out", f"hf://{REPO_ID}/checkpoint-4")
    assert code == 1 and "checkpoint-4/optimizer_state.pth downloaded from" in err and "does not match" in err
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    assert "Resumed" not in err
