"""Model bundles: a directory with ``config.json``, ``model.safetensors`` and ``fingerprint``.

The fingerprint (sha256 of the two files) names the exact model that produced a set of
vectors; an index store records it so that vectors from different models are never mixed.
Weights are safetensors only: a bundle from elsewhere can never run code when loaded.

A trunk that is exactly its backbone's offline ImageNet weights (a frozen trunk, the usual
case) is not stored: ``config.json`` names it under ``offline_trunks`` with the sha256 of its
tensors, and loading takes the weights from the installed package and checks that digest.
So a bundle holds what training changed (the head), and a fusion of three trunks stays a few
megabytes; the digest, being in ``config.json``, is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import atomic_write, files_sha256, fsync_dir
from .errors import BackboneError, BundleError, ConfigError
from .model import CALIBRATION_FILE, ModelFacts, load_calibration

if TYPE_CHECKING:
    from .network import EmbeddingConfig, EmbeddingNet

__all__ = [
    "BundleError",
    "ModelBundle",
    "save_bundle",
    "load_bundle",
    "pretrained_bundle",
    "is_bundle",
    "CALIBRATION_FILE",
    "DEFAULT_BUNDLE",
    "SHIPPED_BUNDLES",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FINGERPRINT_FILE = "fingerprint"
OFFLINE_TRUNKS = "offline_trunks"
"""``config.json`` key: ``{trunk index: {"backbone": name, "sha256": digest}}`` of the trunks
whose weights come from the offline packages instead of ``model.safetensors``."""
DEFAULT_BUNDLE = Path(__file__).parent / "default"
"""The shipped trained model (``models/recipes/default.toml``), installed with the package."""
SHIPPED_BUNDLES = {"default": DEFAULT_BUNDLE, "accurate": Path(__file__).parent / "accurate"}
"""Trained models installed with the package, by the name ``--model`` takes: ``accurate`` is
a slower fusion of three trunks (``models/recipes/accurate.toml``)."""


class ModelBundle:
    """A trainable model: the network plus the facts that identify it (a :class:`~.model.Model`).

    The network is built on first use of :attr:`net`: a bundle whose ONNX conversion is
    already cached runs without importing torch at all. Its ``facts`` come from
    ``config.json`` directly when that file holds them (every saved bundle with a head does).
    """

    def __init__(
        self,
        net: EmbeddingNet | None,
        fingerprint: str,
        path: Path | None,
        name: str,
        calibration: dict[str, Any] | None = None,
        *,
        raw_config: dict[str, Any] | None = None,
    ) -> None:
        if net is None and path is None:
            raise BundleError(f"model {name} has neither a network nor a bundle directory")
        self._net = net
        self.fingerprint = fingerprint
        self.path = path
        self.name = name
        self._calibration = calibration
        self._raw_config = raw_config
        self._lock = threading.Lock()

    @property
    def calibration(self) -> dict[str, Any] | None:
        """``calibration.json`` (threshold, target false-match rate, ...), or None."""
        return self._calibration

    @property
    def net(self) -> EmbeddingNet:
        """The eval-mode network, built from the bundle's files on first use."""
        with self._lock:
            if self._net is None:
                assert self.path is not None
                self._net = _load_net(self.path)
            return self._net

    @property
    def config(self) -> EmbeddingConfig:
        return self.net.config

    @property
    def facts(self) -> ModelFacts:
        facts = _facts_from_json(self._raw_config) if self._net is None else None
        if facts is not None:
            return facts
        config = self.config
        return ModelFacts(config.input_size, config.mean, config.std, config.embedding_dim)

    def onnx_file(self, int8: bool) -> Path | None:
        """A bundle has no exported file of its own: the ONNX engines convert it."""
        return None

    def torch_net(self) -> EmbeddingNet:
        return self.net


def _facts_from_json(raw: dict[str, Any] | None) -> ModelFacts | None:
    """Facts read straight from ``config.json``, or None when it does not state them all
    (a headless model's width needs the backbone built)."""
    try:
        assert raw is not None
        head = list(raw["head"])
        mean, std = tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"])
        size = int(raw["input_size"])
    except (AssertionError, KeyError, TypeError, ValueError):
        return None
    if not head or size <= 0 or len(mean) != 3 or len(std) != 3 or not any(std):
        return None
    return ModelFacts(size, mean, std, int(head[-1]))  # type: ignore[arg-type]


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _digest(directory: Path) -> str:
    return files_sha256(directory / CONFIG_FILE, directory / WEIGHTS_FILE)


def save_bundle(
    net: EmbeddingNet, path: str | Path, *, precision: str = "float32",
    offline_trunks: bool = True,
) -> str:
    """Write ``net`` as a bundle at ``path`` (atomically) and return its fingerprint.

    The files are written and fsynced in a sibling directory that then replaces ``path``, so
    a reader sees the old bundle or the whole new one. ``precision`` (:data:`PRECISIONS`) is
    how the weights are stored; they are loaded back as float32. With ``offline_trunks`` (the
    default), trunks identical to their offline ImageNet weights are referenced, not stored.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    references = _unchanged_offline_trunks(net) if offline_trunks else {}
    skipped = tuple(f"trunks.{index}." for index in references)
    config = net.config.to_dict()
    if references:
        config[OFFLINE_TRUNKS] = references
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = _stored(
            {key: value.detach().contiguous().cpu() for key, value in net.state_dict().items()
             if not key.startswith(skipped)}, precision)
        atomic_write(tmp / WEIGHTS_FILE, lambda target: save_file(state, str(target)))
        atomic_write(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
        fingerprint = _digest(tmp)
        atomic_write(tmp / FINGERPRINT_FILE, fingerprint + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fingerprint


PRECISIONS = ("float32", "float16", "int8")
"""How :func:`save_bundle` stores weights. ``int8``: each matrix or kernel (a floating tensor
of two or more dimensions) as int8 with one float32 scale per output row (symmetric, the
row's largest magnitude maps to 127), the other floating tensors as float16; a quarter of
float32 for a linear head, which is what makes a three-trunk fusion head fit."""

INT8_SCALE = ".int8_scale"
"""Suffix of the state entry holding an int8 tensor's per-row scales."""


def int8_rows(tensor: Any) -> tuple[Any, Any]:
    """``tensor`` (``(rows, ...)``, floating) as int8 codes and one float32 scale per row:
    ``codes * scale`` (broadcast over the row) is what loading gives back."""
    import torch

    rows = tensor.float().reshape(len(tensor), -1)
    peak = rows.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    codes = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(tensor.shape).contiguous(), scale.contiguous()


def from_int8_rows(codes: Any, scale: Any) -> Any:
    """The float32 tensor that :func:`int8_rows`' ``codes`` and per-row ``scale`` stand for."""
    return codes.float() * scale.float().reshape(-1, *([1] * (codes.dim() - 1)))


def _stored(state: dict[str, Any], precision: str) -> dict[str, Any]:
    """A state dict's tensors as ``precision`` stores them."""
    if precision not in PRECISIONS:
        raise BundleError(f"unknown weight precision {precision!r}; one of {PRECISIONS}")
    stored = {}
    for key, value in state.items():
        if not value.is_floating_point() or precision == "float32":
            stored[key] = value
        elif precision == "int8" and value.dim() >= 2:
            stored[key], stored[key + INT8_SCALE] = int8_rows(value)
        else:
            stored[key] = value.half()
    return stored


def _loaded(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Stored tensors back as float32 (int8 ones times their row scales)."""
    import torch

    loaded = {}
    for key, value in state.items():
        if key.endswith(INT8_SCALE):
            continue
        scale = state.get(key + INT8_SCALE)
        if (value.dtype == torch.int8) != (scale is not None):
            raise BundleError(f"model bundle {path} has a damaged int8 tensor {key!r}")
        if scale is not None:
            if scale.shape != (len(value),):
                raise BundleError(f"model bundle {path} has a damaged int8 tensor {key!r}")
            value = from_int8_rows(value, scale)
        loaded[key] = value.float() if value.is_floating_point() else value
    orphans = [key for key in state if key.endswith(INT8_SCALE)
               and key[: -len(INT8_SCALE)] not in state]
    if orphans:
        raise BundleError(f"model bundle {path} has scales without tensors: {orphans}")
    return loaded


def load_bundle(path: str | Path, *, lazy: bool = False) -> ModelBundle:
    """Load a bundle directory, verifying its fingerprint and calibration.

    The network is built now (so a config that does not fit its weights fails here), or on
    first use when ``lazy`` (what :func:`~.resolve.resolve_model` asks for, so that a model
    whose ONNX conversion is cached never imports torch).
    """
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
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"model bundle {path} has an invalid config.json: {exc}") from exc
    bundle = ModelBundle(None, fingerprint, path, path.name,
                         load_calibration(path, fingerprint), raw_config=raw)
    if not lazy:
        bundle.net  # noqa: B018 - build now, so errors surface at load
    return bundle


def _load_net(path: Path) -> EmbeddingNet:
    """Build the eval-mode network of bundle ``path`` from its files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .network import EmbeddingConfig, EmbeddingNet

    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        references = raw.pop(OFFLINE_TRUNKS, {}) if isinstance(raw, dict) else {}
        config = EmbeddingConfig.from_dict(raw)
        net = EmbeddingNet(config, pretrained=False)
        state = _loaded(load_file(str(path / WEIGHTS_FILE)), path)
        state.update(_offline_trunk_state(path, config.backbones, references))
        net.load_state_dict(state)
    except (json.JSONDecodeError, TypeError, ConfigError, BackboneError) as exc:
        raise BundleError(f"model bundle {path} has an invalid config.json: {exc}") from exc
    except (SafetensorError, RuntimeError) as exc:
        raise BundleError(
            f"model bundle {path} has weights that do not fit its config: {exc}"
        ) from exc
    return net.eval()


def _tensors_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unchanged_offline_trunks(net: EmbeddingNet) -> dict[str, dict[str, str]]:
    """The trunks of ``net`` whose tensors equal their backbone's offline ImageNet weights
    (every tensor compared), by index, with the digest that loading checks."""
    import torch

    from .backbones import create_backbone, get_backbone_spec

    found = {}
    for index, (name, trunk) in enumerate(zip(net.config.backbones, net.trunks, strict=True)):
        if not get_backbone_spec(name).offline_weights:
            continue
        try:
            pristine = create_backbone(name, pretrained=True)[0].state_dict()
        except BackboneError:  # its package is not installed here: store the weights
            continue
        own = trunk.state_dict()
        if own.keys() == pristine.keys() and all(
                torch.equal(own[key].cpu(), pristine[key]) for key in own):
            found[str(index)] = {"backbone": name, "sha256": _tensors_digest(own)}
    return found


def _offline_trunk_state(path: Path, backbones: tuple[str, ...], references: Any
                         ) -> dict[str, Any]:
    """The state-dict entries of the trunks ``config.json`` references, from the offline
    packages, after checking each against its recorded digest."""
    from .backbones import create_backbone

    if not isinstance(references, dict):
        raise BundleError(f"model bundle {path} has a damaged {OFFLINE_TRUNKS!r} entry")
    state = {}
    for index, reference in references.items():
        try:
            name = backbones[int(index)]
            recorded = reference["sha256"]
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise BundleError(
                f"model bundle {path} has a damaged {OFFLINE_TRUNKS!r} entry: {exc}") from exc
        if reference.get("backbone") != name:
            raise BundleError(f"model bundle {path}: trunk {index} is {name}, but its offline "
                              f"weights are recorded for {reference.get('backbone')!r}")
        trunk = create_backbone(name, pretrained=True)[0].state_dict()
        if _tensors_digest(trunk) != recorded:
            raise BundleError(
                f"model bundle {path} was trained on other {name} weights than the installed "
                "package holds (sha256 differs); install the package version it names")
        state.update({f"trunks.{index}.{key}": value for key, value in trunk.items()})
    return state


def pretrained_bundle(backbone: str, cache_dir: str | Path, *, lazy: bool = False) -> ModelBundle:
    """The untrained model for ``backbone``: ImageNet trunk, average pooling, identity head.

    Built from the offline weights on first use and cached as a bundle, so its fingerprint
    is stable across runs.
    """
    path = Path(cache_dir) / "models" / f"{backbone.replace(':', '_')}-imagenet"
    if not (path / FINGERPRINT_FILE).is_file():
        from .network import EmbeddingConfig, EmbeddingNet

        net = EmbeddingNet(EmbeddingConfig(backbones=(backbone,)), pretrained=True)
        save_bundle(net, path)
    return load_bundle(path, lazy=lazy)
