"""The local Hub test server must behave like the Hub for the real huggingface_hub client, or tests built on
it prove nothing: these drive it only through the public client API (Xet off, as the trainer's tests do)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hub_server import HubServer, running_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

hub = pytest.fixture(running_hub, name="hub")

REPO = "test-user/ckpt"
CONFIG = b'{"lr": 0.001, "steps": 10}\n'
WEIGHTS = os.urandom(4096)  # small, but .safetensors => LFS
BIG = os.urandom(11 * 1024 * 1024)  # no LFS extension, but over 10 MiB => LFS


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client would upload through Xet (and 404 on a plain server) unless it is disabled."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _api(hub: HubServer, token: str | bool | None = None) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token if token is None else token)


def _push_checkpoint(api: HfApi) -> str:
    api.create_repo(REPO)
    info = api.create_commit(
        REPO,
        [
            CommitOperationAdd("config.json", CONFIG),
            CommitOperationAdd("ckpt/model.safetensors", WEIGHTS),
            CommitOperationAdd("ckpt/sub/big.dat", BIG),
        ],
        commit_message="step 10",
    )
    return info.oid


def _download(hub: HubServer, filename: str, cache: Path, revision: str | None = None) -> bytes:
    path = hf_hub_download(REPO, filename, revision=revision, cache_dir=cache, endpoint=hub.url, token=hub.token)
    return Path(path).read_bytes()


def test_whoami_and_create_repo(hub: HubServer) -> None:
    api = _api(hub)
    assert api.whoami()["name"] == "test-user"
    url = api.create_repo("ckpt", private=True)  # no namespace: the token's user
    assert url.repo_id == REPO and url.startswith(hub.url)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 body carries the url
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    info = api.repo_info(REPO)
    assert len(info.sha) == 40 and [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert [c.summary for c in hub.commits(REPO)] == ["initial commit"]


def test_commit_upload_list_and_download(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    oid = _push_checkpoint(api)

    assert len(oid) == 40 and hub.commits(REPO)[-1].id == oid
    last = hub.commits(REPO)[-1]
    assert (last.summary, last.branch, last.deleted) == ("step 10", "main", ())
    assert set(last.added) == {"config.json", "ckpt/model.safetensors", "ckpt/sub/big.dat"}
    puts = [path for method, path in hub.requests() if method == "PUT"]
    assert len(puts) == 2  # the two LFS files, each uploaded once; config.json went inline in the commit
    assert hub.files(REPO) == {
        ".gitattributes": hub.files(REPO)[".gitattributes"],
        "config.json": CONFIG,
        "ckpt/model.safetensors": WEIGHTS,
        "ckpt/sub/big.dat": BIG,
    }

    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "ckpt/model.safetensors",
        "ckpt/sub/big.dat",
        "config.json",
    ]
    top = {e.path: e for e in api.list_repo_tree(REPO)}
    assert set(top) == {".gitattributes", "ckpt", "config.json"} and top["config.json"].lfs is None
    under = {e.path: e for e in api.list_repo_tree(REPO, path_in_repo="ckpt", recursive=True)}
    assert set(under) == {"ckpt/model.safetensors", "ckpt/sub", "ckpt/sub/big.dat"}
    assert under["ckpt/sub/big.dat"].lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert under["ckpt/sub/big.dat"].size == len(BIG)
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", oid)]
    assert api.repo_info(REPO).sha == oid

    assert _download(hub, "config.json", tmp_path / "a") == CONFIG
    assert _download(hub, "ckpt/sub/big.dat", tmp_path / "a", revision=oid) == BIG
    snapshot = Path(
        snapshot_download(REPO, allow_patterns="ckpt/*", cache_dir=tmp_path / "b", endpoint=hub.url, token=hub.token)
    )
    got = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert got == {"ckpt/model.safetensors": WEIGHTS, "ckpt/sub/big.dat": BIG}
    assert snapshot.name == oid


def test_unchanged_files_are_skipped_like_on_the_hub(hub: HubServer) -> None:
    """Preupload reports the stored oids, so the client drops unchanged files and skips an empty commit."""
    api = _api(hub)
    _push_checkpoint(api)
    n_commits = len(hub.commits(REPO))
    ops = [CommitOperationAdd("config.json", CONFIG), CommitOperationAdd("ckpt/model.safetensors", WEIGHTS)]
    api.create_commit(REPO, ops, commit_message="same again")
    assert len(hub.commits(REPO)) == n_commits
    api.create_commit(REPO, [CommitOperationAdd("config.json", b"{}"), *ops[1:]], commit_message="new cfg")
    assert hub.commits(REPO)[-1].added == ("config.json",)


def test_delete_folder_branches_and_old_revisions(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    first = _push_checkpoint(api)
    second = api.create_commit(
        REPO,
        [CommitOperationDelete("ckpt/"), CommitOperationAdd("last/step.txt", b"20")],
        commit_message="rotate",
        parent_commit=first,
    ).oid
    assert hub.commits(REPO)[-1].deleted == ("ckpt/model.safetensors", "ckpt/sub/big.dat")
    assert set(hub.files(REPO)) == {".gitattributes", "config.json", "last/step.txt"}
    assert hub.files(REPO, revision=first)["ckpt/model.safetensors"] == WEIGHTS  # snapshots are immutable
    assert _download(hub, "ckpt/model.safetensors", tmp_path, revision=first) == WEIGHTS
    with pytest.raises(EntryNotFoundError):
        _download(hub, "ckpt/model.safetensors", tmp_path, revision=second)

    with pytest.raises(HfHubHTTPError) as excinfo:  # stale parent: someone committed since
        api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="late", parent_commit=first)
    assert excinfo.value.response.status_code == 412

    api.create_branch(REPO, branch="keep", revision=first)
    branches = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert branches == {"main": second, "keep": first}
    api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="on keep", revision="keep")
    assert hub.commits(REPO)[-1].branch == "keep" and "x.txt" not in hub.files(REPO)
    assert _download(hub, "ckpt/model.safetensors", tmp_path, revision="keep") == WEIGHTS


def test_auth_and_typed_errors(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    for call in (lambda: _api(hub, "hf_wrong").whoami(), lambda: _api(hub, "hf_wrong").repo_info(REPO)):
        with pytest.raises(HfHubHTTPError) as excinfo:
            call()
        assert excinfo.value.response.status_code == 401
        assert not isinstance(excinfo.value, RepositoryNotFoundError)

    anonymous = _api(hub, token=False)
    assert anonymous.repo_info(REPO).sha == api.repo_info(REPO).sha  # reads need no token
    with pytest.raises(HfHubHTTPError) as excinfo:  # writes do
        anonymous.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="anon")
    assert excinfo.value.response.status_code == 401

    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("test-user/missing")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(REPO, revision="nope")
    with pytest.raises(EntryNotFoundError):
        _download(hub, "missing.bin", tmp_path)


def test_fail_next(hub: HubServer) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    hub.fail_next(1, status=503)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.repo_info(REPO)
    assert excinfo.value.response.status_code == 503
    assert api.repo_info(REPO).sha

    hub.fail_next(1, match="/commit/")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="fails")
    assert excinfo.value.response.status_code == 500
    assert len(hub.commits(REPO)) == 1
    api.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="works")
    assert hub.files(REPO)["a.txt"] == b"a"


def test_stop_and_start_keep_port_and_data(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    _push_checkpoint(api)
    api.repo_info(REPO)  # leaves a keep-alive connection in the client's pool
    port = hub.port
    hub.stop()
    with pytest.raises(httpx.TransportError):
        api.repo_info(REPO)
    hub.start()
    assert hub.port == port
    assert _download(hub, "ckpt/model.safetensors", tmp_path) == WEIGHTS


def test_corrupt_keeps_size_and_advertised_hash(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    _push_checkpoint(api)
    hub.corrupt(REPO, "ckpt/model.safetensors")
    data = _download(hub, "ckpt/model.safetensors", tmp_path)
    (entry,) = [e for e in api.list_repo_tree(REPO, path_in_repo="ckpt") if e.path == "ckpt/model.safetensors"]
    assert len(data) == len(WEIGHTS) and data != WEIGHTS
    assert hashlib.sha256(data).hexdigest() != entry.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()


def test_delay_makes_commits_slow(hub: HubServer) -> None:
    api = _api(hub)
    api.create_repo(REPO)
    hub.set_delay(0.4, upload=False)
    start = time.monotonic()
    future = api.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="slow", run_as_future=True)
    time.sleep(0.1)
    assert not future.done() and len(hub.commits(REPO)) == 1  # not visible before the delay has passed
    assert future.result().oid == hub.commits(REPO)[-1].id
    assert time.monotonic() - start >= 0.4

    future = api.create_commit(REPO, [CommitOperationAdd("b.txt", b"b")], commit_message="cut off", run_as_future=True)
    time.sleep(0.1)
    hub.stop()  # the server goes down mid-commit: the client sees an error and the commit never lands
    assert isinstance(future.exception(timeout=5), httpx.TransportError)
    time.sleep(0.4)
    hub.start()
    assert [c.summary for c in hub.commits(REPO)] == ["initial commit", "slow"]


def test_lfs_upload_checks_sha256_and_size(hub: HubServer) -> None:
    _api(hub).create_repo(REPO)
    data = b"payload"
    obj = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
    batch_url = f"{hub.url}/{REPO}.git/info/lfs/objects/batch"
    auth = {"Authorization": f"Bearer {hub.token}"}
    batch = httpx.post(batch_url, json={"operation": "upload", "objects": [obj]}, headers=auth).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=b"tampered").status_code == 400
    assert httpx.put(href, content=data).status_code == 200  # no Authorization: the href is the credential
    batch = httpx.post(batch_url, json={"operation": "upload", "objects": [obj]}, headers=auth).json()
    assert "actions" not in batch["objects"][0]  # already stored


def test_dataset_repos(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    api.create_repo(REPO, repo_type="dataset")
    api.create_commit(REPO, [CommitOperationAdd("data/x.bin", b"\0\1")], commit_message="data", repo_type="dataset")
    path = hf_hub_download(
        REPO, "data/x.bin", repo_type="dataset", cache_dir=tmp_path, endpoint=hub.url, token=hub.token
    )
    assert Path(path).read_bytes() == b"\0\1"
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(REPO)  # the model repo of that name does not exist


def test_tags(hub: HubServer, tmp_path: Path) -> None:
    """lerobot finds a dataset's format version among the repo's tags, and replaces the tag on every push."""
    api = _api(hub)
    api.create_repo(REPO, repo_type="dataset")
    first = api.create_commit(
        REPO, [CommitOperationAdd("meta/info.json", b"1")], commit_message="v1", repo_type="dataset"
    ).oid
    api.create_tag(REPO, tag="v3.0", repo_type="dataset")
    api.create_commit(REPO, [CommitOperationAdd("meta/info.json", b"2")], commit_message="v2", repo_type="dataset")
    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v3.0", "refs/tags/v3.0", first)]
    assert [b.name for b in refs.branches] == ["main"]
    download = {"repo_type": "dataset", "cache_dir": tmp_path, "endpoint": hub.url, "token": hub.token}
    assert Path(hf_hub_download(REPO, "meta/info.json", revision="v3.0", **download)).read_bytes() == b"1"
    assert Path(hf_hub_download(REPO, "meta/info.json", **download)).read_bytes() == b"2"
    assert api.dataset_info(REPO, revision="v3.0").sha == first

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_tag(REPO, tag="v3.0", repo_type="dataset")
    assert excinfo.value.response.status_code == 409
    api.create_tag(REPO, tag="v3.0", repo_type="dataset", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(REPO, tag="v9", revision="no-such-branch", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as excinfo:
        _api(hub, token=False).create_tag(REPO, tag="v9", repo_type="dataset")
    assert excinfo.value.response.status_code == 401

    api.delete_tag(REPO, tag="v3.0", repo_type="dataset")
    assert api.list_repo_refs(REPO, repo_type="dataset").tags == []
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="v3.0", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(REPO, revision="v3.0")


def test_main_prints_url() -> None:
    script = Path(__file__).with_name("hub_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/whoami-v2").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=5)
