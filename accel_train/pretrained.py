"""Pretrained lerobot policies to fine-tune (`--policy.path=REPO_ID|DIR`), resolved to local files and pinned.

A pretrained policy is a folder written by lerobot's `save_pretrained` (as `lerobot-train` writes its final model):
    config.json                      the policy config (lerobot format, with its "type")
    model.safetensors                the weights
    policy_preprocessor.json         the processor pipelines (optional), with their
    policy_postprocessor.json        policy_*_step_*.safetensors stats files beside them

Given a folder, it is used where it is. Given a Hub repo id, the revision (`--policy.pretrained_revision`, default
the repo's default branch) is resolved to a commit once, and every file is downloaded at that commit, never at a
branch that may move. Either way the run records where the weights came from and the sha256 of model.safetensors
(`BasePolicy`), so that what was fine-tuned can be told, and fetched again and verified, later.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from accel_train.checkpoint import POLICY_CONFIG_FILE as CONFIG_FILE
from accel_train.checkpoint import PRETRAINED_WEIGHTS as WEIGHTS_FILE
from accel_train.checkpoint import sha256
from accel_train.config import BasePolicy
from accel_train.errors import TrainError

log = logging.getLogger(__name__)

# What a fine-tune needs from a pretrained repo: the config, weights and processors (not READMEs, not other files).
FILES = [CONFIG_FILE, WEIGHTS_FILE, "policy_*processor*.json", "policy_*processor*.safetensors"]


def is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()


def resolve(path: str, revision: str | None) -> BasePolicy:
    """The pretrained policy at `path` (a folder, else a Hub repo id), its commit resolved (main process only)."""
    if is_local(path):
        folder = Path(path).expanduser().resolve()
        _require_files(folder, path)
        return BasePolicy(str(folder), revision, None, sha256(folder / WEIGHTS_FILE))
    commit = _resolve_commit(path, revision)
    folder = download(BasePolicy(path, revision, commit))
    _require_files(folder, f"{path}@{commit[:8]}")
    return BasePolicy(path, revision, commit, sha256(folder / WEIGHTS_FILE))


def local_folder(base: BasePolicy) -> Path:
    """The files of a resolved base on this machine (downloaded at its commit when they are not here yet)."""
    return Path(base.path) if base.commit is None else download(base)


def download(base: BasePolicy) -> Path:
    try:
        return Path(snapshot_download(base.path, revision=base.commit, allow_patterns=FILES))
    except Exception as error:  # HTTP and transport errors
        raise TrainError(
            f"Could not download the pretrained policy {base.path} at commit {base.commit} from the Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Check the network and "
            "HF_TOKEN, or download it once and pass its folder: --policy.path=DIR."
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """The pretrained policy's config.json, as the base layer of the run's policy config."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise TrainError(f"Could not read {folder / CONFIG_FILE}: {error}.") from None
    if not isinstance(config, dict) or "type" not in config:
        raise TrainError(f'{folder / CONFIG_FILE} is not a lerobot policy config (it names no policy "type").')
    return config


def verify(base: BasePolicy, folder: Path) -> None:
    """The base's weights in `folder` must be the ones recorded when the run started."""
    check_same_weights(base, sha256(folder / WEIGHTS_FILE))


def check_same_weights(base: BasePolicy, found: str) -> None:
    """`found`, the sha256 of a base's model.safetensors, must be the one recorded when the run started."""
    if base.sha256 and found != base.sha256:
        where = f"{base.path}@{base.commit}" if base.commit else base.path
        raise TrainError(
            f"The pretrained base policy {where} has changed: its {WEIGHTS_FILE} has sha256 {found}, but this run "
            f"was started from {base.sha256}. Point --policy.path at a copy of the original weights."
        )


def _require_files(folder: Path, where: str) -> None:
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise TrainError(
            f"{where} is not a lerobot pretrained policy: it has no {' and no '.join(missing)} (a policy saved with "
            "lerobot's save_pretrained, or the final model of a lerobot-train or accel-train run, has both)."
        )


def _resolve_commit(repo_id: str, revision: str | None) -> str:
    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise TrainError(f"The pretrained policy {repo_id} has no revision '{revision}' on the Hub.") from None
    except RepositoryNotFoundError:
        raise TrainError(
            f"--policy.path={repo_id}: there is no such folder here ({Path(repo_id).expanduser().resolve()}) and no "
            "such model repo on the Hub (or it is private and HF_TOKEN cannot see it)."
        ) from None
    except Exception as error:  # HTTP and transport errors, e.g. offline
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TrainError(
            f"--policy.path={repo_id}: there is no such folder here ({Path(repo_id).expanduser().resolve()}), and "
            f"the Hub could not be asked for it ({type(error).__name__}: {cause}). Offline, download the policy "
            "once and pass its folder."
        ) from None
