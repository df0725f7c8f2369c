"""Does a policy fit a dataset? Its features against the dataset's, after `--rename_map`, shape for shape.

lerobot's rule for the vectors: a policy that pads its state and action to `max_state_dim` / `max_action_dim`
(SmolVLA, pi0, pi0.5, ...) takes any dimension up to those; any other policy needs the dimension it was built
with. Camera images may differ in size (every policy resizes or pools them).
"""

from __future__ import annotations

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.feature_utils import dataset_to_policy_features

from accel_train.errors import TrainError

PADDED_TO = {FeatureType.STATE: "max_state_dim", FeatureType.ACTION: "max_action_dim"}


def renamed_features(dataset: LeRobotDataset, rename_map: dict[str, str]) -> dict[str, PolicyFeature]:
    """The dataset's policy features under the names the policy sees; a rename_map key it lacks is an error."""
    features = dataset_to_policy_features(dataset.meta.features)
    unknown = sorted(set(rename_map) - set(features))
    if unknown:
        raise TrainError(
            f"--rename_map renames {', '.join(unknown)}, which the dataset '{dataset.repo_id}' does not have. Its "
            f"features: {', '.join(sorted(features))}."
        )
    return {rename_map.get(key, key): feature for key, feature in features.items()}


def check_fits(policy_cfg: PreTrainedConfig, dataset: LeRobotDataset, rename_map: dict[str, str], source: str) -> None:
    """Every feature the policy expects is in the dataset (after renaming) with a shape the policy takes."""
    available = renamed_features(dataset, rename_map)
    expected = {**policy_cfg.input_features, **policy_cfg.output_features}
    missing = [key for key in expected if key not in available]
    if missing:
        raise TrainError(
            f"The policy from {source} expects {', '.join(missing)}, which the dataset '{dataset.repo_id}' does not "
            f"have{' after --rename_map' if rename_map else ''}. The dataset has: {', '.join(sorted(available))}."
            + _rename_hint(missing, available, expected)
        )
    for key, feature in expected.items():
        _check_shape(policy_cfg, key, feature, available[key], (source, dataset.repo_id))


def adopt_dataset_shapes(policy_cfg: PreTrainedConfig, dataset: LeRobotDataset, rename_map: dict[str, str]) -> None:
    """After `check_fits`: the config's input features take the dataset's shapes (a padded state may be smaller
    than the pretrained one's), so that the fine-tuned model's config.json describes what it was trained on."""
    available = renamed_features(dataset, rename_map)
    for key, feature in policy_cfg.input_features.items():
        policy_cfg.input_features[key] = PolicyFeature(type=feature.type, shape=tuple(available[key].shape))


def _check_shape(
    policy_cfg: PreTrainedConfig, key: str, wanted: PolicyFeature, got: PolicyFeature, where: tuple[str, str]
) -> None:
    if wanted.type is FeatureType.VISUAL or tuple(wanted.shape) == tuple(got.shape):
        return
    limit_name = PADDED_TO.get(wanted.type)
    limit = getattr(policy_cfg, limit_name, None) if limit_name else None
    if limit is not None and len(got.shape) == 1 and got.shape[0] <= limit:
        return
    allowed = (
        f"this {policy_cfg.type} policy pads it to {limit_name}={limit}, so any size up to {limit} fits"
        if limit is not None
        else f"this {policy_cfg.type} policy takes only the size it was trained with"
    )
    raise TrainError(
        f"The policy from {where[0]} expects '{key}' of shape {tuple(wanted.shape)}, but the dataset '{where[1]}' "
        f"has shape {tuple(got.shape)}: {allowed}. Use a dataset with that many values, or train a new policy "
        "(--policy.type) for this robot."
    )


def _rename_hint(missing: list[str], available: dict[str, PolicyFeature], expected: dict) -> str:
    """A --rename_map that pairs each missing camera with a dataset camera the policy does not use, if any."""
    spare = [k for k, f in available.items() if f.type is FeatureType.VISUAL and k not in expected]
    wanted = [k for k in missing if expected[k].type is FeatureType.VISUAL]
    pairs = dict(zip(spare, wanted, strict=False))
    if not pairs:
        return ""
    mapping = ", ".join(f'"{theirs}": "{ours}"' for theirs, ours in pairs.items())
    return f" Map the dataset's cameras to the policy's, e.g. --rename_map='{{{mapping}}}'."
