"""The backbone registry and the offline ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lookalike.models.backbones import (
    BackboneError,
    create_backbone,
    create_efficientnet_lite,
    get_backbone_spec,
    list_backbones,
)
from lookalike.models.preprocess import Preprocessor

# Real photos in the demo set and their ImageNet classes.
KNOWN_PHOTOS = {"cbi": 207, "bto": 364, "epo": 335, "bvp": 219}
# golden retriever, three-toed sloth, fox squirrel, English cocker spaniel


def test_offline_weights_classify_real_photos(demo_dir: Path) -> None:
    """The check that the weights loaded: a random or misaligned network gets these wrong."""
    model = create_efficientnet_lite(0, pretrained=True, weights=None, num_classes=1000).eval()
    prep = Preprocessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = [Image.open(demo_dir / "right" / f"{key}.jpg").convert("RGB") for key in KNOWN_PHOTOS]
    with torch.inference_mode():
        probs = model(torch.from_numpy(prep.batch(images))).softmax(-1)
    assert probs.argmax(-1).tolist() == list(KNOWN_PHOTOS.values())
    assert probs.max(-1).values.min() > 0.5


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_builds_a_feature_map(name: str) -> None:
    trunk, spec = create_backbone(name, pretrained=False)
    size = spec.input_size
    with torch.inference_mode():
        features = trunk.eval()(torch.zeros(1, 3, size, size))
    assert features.ndim == 4 and features.shape[1] == spec.num_features


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        get_backbone_spec("no_such_net")


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_hub_backbones_ask_for_a_local_weights_file(name: str) -> None:
    with pytest.raises(BackboneError, match="--weights FILE"):
        create_backbone(name, pretrained=True)


def test_local_weights_file_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference, _ = create_backbone("timm:resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded, spec = create_backbone("timm:resnet18", pretrained=True, weights=path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded.eval()(x), reference.eval()(x), atol=1e-6)
    assert spec.num_features == 512


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("timm:resnet18", weights=tmp_path / "nope.pth")


def test_weights_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    with pytest.raises(BackboneError, match="tensors"):
        create_backbone("timm:resnet18", weights=path)
