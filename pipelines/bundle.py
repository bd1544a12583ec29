"""The trained-model file (models/model.pt): weights plus everything needed to use them.

    bundle = load_bundle("models/model.pt")
    model = bundle.build_model()              # the network, weights loaded, in eval mode
    output = model(bundle.normalize(features))  # features as in training (standardised or not)

It holds the model name and full MSTembaConfig, the class names, the metadata of the feature
shards it was trained on (extractor, dim, fps...), the training parameters and the selection
(epoch and validation mAP), so inference on new videos can rebuild the feature extractor and the
network without the training configuration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extractors.files import atomic_path

# 2: MSTemba weights under its own module names (blocks.{k}.projection/.tlm/.dts, fuser.*).
# 1: the same under the official release's names; converted on load (ms_temba.convert).
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclass
class ModelBundle:
    model_name: str
    model_config: dict[str, Any]  # dataclasses.asdict(MSTembaConfig)
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    features: dict[str, Any]  # the shards' extractor metadata
    dataset: str
    train_params: dict[str, Any]
    selected_epoch: int
    val_map: float  # percent
    train_videos: list[str]
    val_videos: list[str]
    # Per-dimension standardisation the model was trained with (train.normalize_features), or None.
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None

    def normalize(self, features):
        """Features as the model expects them: (x - mean) / std when trained so, else unchanged."""
        from pipelines.inference import standardize

        if self.feature_mean is None:
            return features
        return standardize(features, self.feature_mean, self.feature_std)

    def build_model(self, device: str | torch.device = "cpu"):
        import ms_temba

        model = ms_temba.create_model(self.model_name, **self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def save_bundle(path: str | Path, bundle: ModelBundle) -> None:
    # Saved through a file object: torch.save(obj, path) names the zip's top folder after the
    # file, here the random temporary name, so the same model would give other bytes every time.
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        torch.save({"format": BUNDLE_FORMAT, **dataclasses.asdict(bundle)}, file)


def load_bundle(path: str | Path) -> ModelBundle:
    """The ModelBundle in `path`, in the current format: a file of an older format is converted
    (format 1: `ms_temba.convert.upgrade_format1_state_dict`). ValueError for any other file."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    file_format = content.pop("format", None) if isinstance(content, dict) else None
    if file_format not in READABLE_FORMATS:
        raise ValueError(f"{path} is not an ms-temba model file of format "
                         f"{' or '.join(map(str, READABLE_FORMATS))}")
    if file_format == 1:
        from ms_temba.convert import upgrade_format1_state_dict

        content["state_dict"] = upgrade_format1_state_dict(content["model_name"], content["state_dict"])
    return ModelBundle(**content)
