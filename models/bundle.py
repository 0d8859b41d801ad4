"""Model bundles: a directory with ``config.json``, ``model.safetensors`` and ``fingerprint``.

The fingerprint (sha256 of the two files) names the exact model that produced a set of
vectors; an index store records it so that vectors from different models are never mixed.
Weights are safetensors only: a bundle from elsewhere can never run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbones import BackboneError, get_backbone_spec
from .errors import BundleError
from .network import ConfigError, EmbeddingConfig, EmbeddingNet

__all__ = [
    "BundleError",
    "ModelBundle",
    "save_bundle",
    "load_bundle",
    "pretrained_bundle",
    "resolve_model",
    "load_calibration",
    "DEFAULT_BUNDLE",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FINGERPRINT_FILE = "fingerprint"
DEFAULT_BUNDLE = Path(__file__).parent / "default"
"""The shipped trained model (``models/recipes/default.toml``), installed with the package."""
CALIBRATION_FILE = "calibration.json"
"""Verification threshold measured by ``lookalike evaluate --write-calibration``. Kept out of
the fingerprinted files, so calibrating a model never orphans the indexes built with it."""

log = logging.getLogger(__name__)




@dataclass
class ModelBundle:
    """A loaded model: the network in eval mode plus the facts that identify it."""

    net: EmbeddingNet
    fingerprint: str
    path: Path | None
    name: str
    calibration: dict[str, Any] | None = None
    """``calibration.json`` (threshold, target false-match rate, ...), or None if uncalibrated."""

    @property
    def config(self) -> EmbeddingConfig:
        return self.net.config


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        with open(directory / filename, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


def save_bundle(net: EmbeddingNet, path: str | Path, *, half: bool = False) -> str:
    """Write ``net`` as a bundle at ``path`` (atomically) and return its fingerprint.

    ``half=True`` stores weights as float16 (half the size; loaded back as float32).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {
            key: (value.half() if half and value.is_floating_point() else value)
            .detach()
            .contiguous()
            .cpu()
            for key, value in net.state_dict().items()
        }
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(net.config.to_dict(), indent=2, sort_keys=True))
        fingerprint = _digest(tmp)
        (tmp / FINGERPRINT_FILE).write_text(fingerprint + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fingerprint


def load_bundle(path: str | Path) -> ModelBundle:
    """Load a bundle directory, verifying its fingerprint, into an eval-mode network."""
    path = Path(path)
    for filename in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / filename).is_file():
            raise BundleError(f"{path} is not a model bundle: {filename} is missing")
    fingerprint = _digest(path)
    recorded = path / FINGERPRINT_FILE
    if recorded.is_file() and recorded.read_text().strip() != fingerprint:
        raise BundleError(
            f"model bundle {path} does not match its fingerprint: a file was changed or damaged"
        )
    try:
        config = EmbeddingConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        net = EmbeddingNet(config, pretrained=False)
        state = load_file(str(path / WEIGHTS_FILE))
        state = {key: value.float() if value.is_floating_point() else value
                 for key, value in state.items()}
        net.load_state_dict(state)
    except (json.JSONDecodeError, TypeError, ConfigError, BackboneError) as exc:
        raise BundleError(f"model bundle {path} has an invalid config.json: {exc}") from exc
    except (SafetensorError, RuntimeError) as exc:
        raise BundleError(
            f"model bundle {path} has weights that do not fit its config: {exc}"
        ) from exc
    return ModelBundle(net=net.eval(), fingerprint=fingerprint, path=path, name=path.name,
                       calibration=load_calibration(path, fingerprint))


def load_calibration(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The bundle's calibration, or None when it has none or one measured on other weights."""
    file = path / CALIBRATION_FILE
    if not file.is_file():
        return None
    try:
        calibration = json.loads(file.read_text())
        threshold = float(calibration["threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{file} is damaged ({exc}): delete it or run 'lookalike evaluate --write-calibration'"
        ) from exc
    if not -1.0 <= threshold <= 1.0:
        raise BundleError(f"{file} has threshold {threshold}, outside the cosine range [-1, 1]")
    if calibration.get("model_fingerprint") != fingerprint:
        log.warning("ignoring %s: it was measured with other weights; re-run calibration", file)
        return None
    return calibration


def pretrained_bundle(backbone: str, cache_dir: str | Path) -> ModelBundle:
    """The untrained model for ``backbone``: ImageNet trunk, average pooling, identity head.

    Built from the offline weights on first use and cached as a bundle, so its fingerprint
    is stable across runs.
    """
    path = Path(cache_dir) / "models" / f"{backbone.replace(':', '_')}-imagenet"
    if not (path / FINGERPRINT_FILE).is_file():
        net = EmbeddingNet(EmbeddingConfig(backbones=(backbone,)), pretrained=True)
        save_bundle(net, path)
    return load_bundle(path)


def resolve_model(model: str | Path | None, cache_dir: str | Path) -> ModelBundle:
    """Turn what a user typed into a model: a bundle directory, or a backbone name.

    ``None`` means the default model: the shipped trained bundle, or (in a checkout without
    it) the untrained ImageNet EfficientNet-Lite0. A backbone name always means untrained.
    """
    if model is None:
        if (DEFAULT_BUNDLE / CONFIG_FILE).is_file():
            return load_bundle(DEFAULT_BUNDLE)
        return pretrained_bundle("efficientnet_lite0", cache_dir)
    candidate = Path(model)
    if candidate.is_dir():
        return load_bundle(candidate)
    try:
        get_backbone_spec(str(model))
    except BackboneError as exc:
        raise BundleError(
            f"{model!r} is neither a model bundle directory nor a backbone name ({exc})"
        ) from exc
    return pretrained_bundle(str(model), cache_dir)
