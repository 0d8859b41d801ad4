"""The one front door from what a user typed to a loaded model and an embedder.

Every command and the service call :func:`resolve_model` (a serving model directory, a bundle
directory, a backbone name, or nothing for the built-in model) and :func:`create_embedder`.
Offline commands describe what they need in a small :class:`ModelOptions`, read from the
command line and ``LOOKALIKE_*`` variables, never from the HTTP service's settings or ``.env``.

This module imports no torch: a serving model, or a bundle whose ONNX conversion is cached,
loads and runs without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import DEFAULT_BUNDLE, SHIPPED_BUNDLES, is_bundle, load_bundle, pretrained_bundle
from .embedder import Embedder
from .engines import DEFAULT_ENGINE
from .errors import BackboneError, BundleError
from .model import Model
from .preprocess import DEFAULT_MAX_PIXELS
from .serving import is_serving_model, load_serving_model

__all__ = ["ModelOptions", "create_embedder", "default_cache_dir", "resolve_model"]

DEFAULT_BACKBONE = "efficientnet_lite0"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lookalike"


def resolve_model(model: str | Path | None, cache_dir: str | Path) -> Model:
    """Turn what a user typed into a model.

    ``None`` means the default model: the shipped trained bundle, or (in a checkout without
    it) the untrained ImageNet EfficientNet-Lite0. A shipped model's name (``default``,
    ``accurate``) means that bundle. A directory is a serving model (it has ``serving.json``)
    or a bundle; anything else must be a backbone name, which always means untrained. Bundles
    load lazily: torch is imported only if an engine needs the network.
    """
    if model is None:
        if is_bundle(DEFAULT_BUNDLE):
            return load_bundle(DEFAULT_BUNDLE, lazy=True)
        return pretrained_bundle(DEFAULT_BACKBONE, cache_dir, lazy=True)
    shipped = SHIPPED_BUNDLES.get(str(model))
    if shipped is not None and not Path(model).exists():
        if not is_bundle(shipped):
            raise BundleError(f"the shipped model {model!r} is not installed here ({shipped})")
        return load_bundle(shipped, lazy=True)
    candidate = Path(model)
    if candidate.is_dir():
        if is_serving_model(candidate):
            return load_serving_model(candidate)
        return load_bundle(candidate, lazy=True)
    from .backbones import get_backbone_spec  # a backbone name means PyTorch anyway

    try:
        get_backbone_spec(str(model))
    except BackboneError as exc:
        raise BundleError(
            f"{model!r} is neither a model bundle or serving model directory nor a backbone name "
            f"({exc})"
        ) from exc
    return pretrained_bundle(str(model), cache_dir, lazy=True)


def _env(name: str) -> str | None:
    return os.environ.get(f"LOOKALIKE_{name}") or None


@dataclass(frozen=True)
class ModelOptions:
    """What an offline command needs to embed images: the model, the engine and its knobs.

    The HTTP service's ``Settings`` hands one of these down too (``Settings.model_options``),
    so both build their embedder the same way.
    """

    model: str | None = None
    engine: str = DEFAULT_ENGINE
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 2

    @classmethod
    def from_env(cls, **given: object) -> ModelOptions:
        """Options from ``given`` (command-line values; None = not given), else from the
        ``LOOKALIKE_<FIELD>`` variables (``LOOKALIKE_TORCH_THREADS`` for ``threads``)."""
        values: dict[str, object] = {}
        for name, convert in _FIELDS.items():
            value = given.get(name)
            if value is None:
                value = _env("TORCH_THREADS" if name == "threads" else name.upper())
            if value is not None:
                values[name] = convert(value)
        return cls(**values)  # type: ignore[arg-type]

    def resolve(self) -> Model:
        return resolve_model(self.model, self.cache_dir)


_FIELDS: dict[str, type] = {"model": str, "engine": str, "cache_dir": Path, "max_pixels": int,
                            "threads": int}


def create_embedder(options: ModelOptions, model: Model | None = None) -> Embedder:
    """The embedder for ``options`` (``model`` when it is already resolved)."""
    return Embedder(
        model if model is not None else options.resolve(), engine=options.engine,
        max_pixels=options.max_pixels, threads=options.threads, cache_dir=options.cache_dir,
    )

