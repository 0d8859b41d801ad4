"""The exact per-location split of an EmbeddingNet's embedding, derived from the network itself.

For the family the default model belongs to (stage outputs reduced by *linear* poolings: the
average pool of a tap, the cell means of any grid, then an affine standardisation and a
linear head, or none), the embedding before L2 normalisation is

    z = b + sum over pooled stages s and locations l of  G_s[l] @ x_s[:, l]

where ``x_s`` is stage ``s``'s output map, ``G_s[l]`` a fixed ``(D, C)`` matrix and ``b`` a
constant. Nothing here reads the config's taps or grids: :func:`derive_readout` finds the
pooled stages, ``G`` and ``b`` by autograd through the network's own ``features`` (hooks
give each stage's pooled path its own input, so the gradient is the pooling's, not the later
stages'), and then checks on a real image that ``b + sum G x`` rebuilds ``z``. Any other
taps, grid sizes, several grids, several backbones, standardisation or not, a linear head or
none: the same code. A model outside the family (GeM pooling, a non-linear head) fails that
check and gets the occlusion approximation instead (:mod:`.explain`).

:class:`LocationTerms` turns images into the per-location terms summed onto one common grid
over the image (``(B, G*G, D)``): plain tensor operations, so it exports to ONNX as it is and
the torch-free service can explain too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import EngineError
from .network import EmbeddingNet

__all__ = ["LocationTerms", "NotDecomposableError", "Readout", "StageReadout", "derive_readout"]

LINEARITY_TOLERANCE = 1e-4
"""Largest relative error of ``b + sum G x`` against the network's own embedding."""
DIM_CHUNK = 64
"""Embedding dimensions differentiated at once (bounds the Jacobian's memory)."""


class NotDecomposableError(EngineError):
    """The model's embedding is not a constant plus a sum of per-location terms."""


@dataclass(frozen=True)
class StageReadout:
    """How one pooled stage's output map enters the embedding.

    ``weights[types[l]]`` is the ``(D, C)`` matrix of location ``l`` (locations in the same
    cells share one, so the constants stay small); ``spread`` ``(G*G, H*W)`` moves each
    location's term onto the common grid in proportion to area (its columns sum to 1).
    """

    trunk: int
    stage: int
    weights: np.ndarray
    types: np.ndarray
    spread: np.ndarray


@dataclass(frozen=True)
class Readout:
    """Everything :class:`LocationTerms` needs besides the network: the pooled stages, the
    constant ``bias`` ``(D,)`` and the common grid's side."""

    stages: tuple[StageReadout, ...]
    bias: np.ndarray
    grid: int


def derive_readout(net: EmbeddingNet, check: torch.Tensor | None = None) -> Readout:
    """The exact split of ``net``'s embedding; :class:`NotDecomposableError` when the model
    is outside the family. ``check``: real images ``(B, 3, S, S)`` to verify it on."""
    net = net.eval()
    size = net.config.input_size
    images = torch.zeros(1, 3, size, size)
    with _pooled_paths(net) as (clean, deltas), torch.enable_grad():
        z = net.unnormalized(net.features(images))
        used = [key for key, delta in deltas.items()
                if torch.autograd.grad(z.sum(), delta, retain_graph=True, allow_unused=True)[0]
                is not None]
        if not used:
            raise NotDecomposableError("no stage output reaches the embedding linearly")
        jacobians = _jacobians(z, [deltas[key] for key in used])
        shapes = {key: tuple(clean[key].shape[2:]) for key in used}
    bias = _bias(net, images)
    grid = min(min(shape) for shape in shapes.values())
    stages = tuple(
        _stage_readout(key, jacobian, shapes[key], grid)
        for key, jacobian in zip(used, jacobians, strict=True)
    )
    readout = Readout(stages, bias, grid)
    _check_linear(net, readout, check if check is not None else _probe_images(size))
    return readout


def _jacobians(z: torch.Tensor, deltas: list[torch.Tensor]) -> list[np.ndarray]:
    """``dz / d delta`` for each pooled stage: ``(D, C, H, W)`` arrays, in chunks of dims."""
    dim = z.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in deltas]
    eye = torch.eye(dim)
    for start in range(0, dim, DIM_CHUNK):
        rows = eye[start : start + DIM_CHUNK].unsqueeze(1)
        grads = torch.autograd.grad(z, deltas, grad_outputs=rows, retain_graph=True,
                                    is_grads_batched=True, allow_unused=True)
        for part, grad, delta in zip(parts, grads, deltas, strict=True):
            grad = torch.zeros((len(rows), *delta.shape)) if grad is None else grad
            part.append(grad[:, 0].numpy())
    return [np.concatenate(part) for part in parts]


def _stage_readout(
    key: tuple[int, int], jacobian: np.ndarray, shape: tuple[int, int], grid: int
) -> StageReadout:
    """Group locations by their (bit-identical) matrices and build the spread to the grid."""
    dim, channels = jacobian.shape[:2]
    columns = np.ascontiguousarray(jacobian.reshape(dim * channels, -1).T)  # (L, D*C)
    kinds: dict[bytes, int] = {}
    types = np.array([kinds.setdefault(row.tobytes(), len(kinds)) for row in columns])
    first = [int(np.argmax(types == kind)) for kind in range(len(kinds))]
    weights = columns[first].reshape(len(first), dim, channels)
    spread = np.kron(_overlap(shape[0], grid), _overlap(shape[1], grid))
    return StageReadout(key[0], key[1], weights.astype(np.float32),
                        types.reshape(-1).astype(np.int64), spread.astype(np.float32))


def _overlap(size: int, grid: int) -> np.ndarray:
    """``(grid, size)``: the share of source cell ``j`` (of ``size`` over [0, 1]) that lies
    in target cell ``i`` (of ``grid``); each column sums to 1."""
    edges_source = np.arange(size + 1) / size
    edges_target = np.arange(grid + 1) / grid
    low = np.maximum(edges_target[:-1, None], edges_source[None, :-1])
    high = np.minimum(edges_target[1:, None], edges_source[None, 1:])
    return np.clip(high - low, 0.0, None) * size


def _bias(net: EmbeddingNet, images: torch.Tensor) -> np.ndarray:
    """The embedding (before normalisation) when every pooled map is zero."""
    with _pooled_paths(net, zero=True), torch.no_grad():
        return net.unnormalized(net.features(images))[0].double().numpy()


class _pooled_paths:  # noqa: N801 - used as a context manager, named like one
    """Hooks giving each stage's pooled path an input of its own: the output is ``x + delta``
    (``delta`` zeros that require grad) for the pooling, while the next stage gets ``x``.
    With ``zero`` the pooling sees zeros instead (for the constant term)."""

    def __init__(self, net: EmbeddingNet, zero: bool = False) -> None:
        self.net, self.zero = net, zero
        self.clean: dict[tuple[int, int], torch.Tensor] = {}
        self.deltas: dict[tuple[int, int], torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> tuple[dict, dict]:
        for t, stages in enumerate(self.net.stages):
            for i, stage in enumerate(stages):
                self.handles.append(stage.register_forward_hook(self._output((t, i))))
                if i + 1 < len(stages):
                    following = stages[i + 1]
                    self.handles.append(following.register_forward_pre_hook(self._input((t, i))))
        return self.clean, self.deltas

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _output(self, key: tuple[int, int]):  # noqa: ANN202
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            self.clean[key] = output.detach()
            delta = torch.zeros_like(output, requires_grad=not self.zero)
            self.deltas[key] = delta
            return delta if self.zero else self.clean[key] + delta
        return hook

    def _input(self, key: tuple[int, int]):  # noqa: ANN202
        def hook(module: nn.Module, inputs: object) -> tuple[torch.Tensor]:
            return (self.clean[key],)
        return hook


def _probe_images(size: int) -> torch.Tensor:
    """Two smooth random images (a seeded generator: the check must not move global RNG)."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 8, 8, generator=generator) * 4 - 2
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def _check_linear(net: EmbeddingNet, readout: Readout, images: torch.Tensor) -> None:
    """Refuse a split that does not rebuild the network's own embedding."""
    with torch.no_grad():
        expected = net.unnormalized(net.features(images)).double().numpy()
        terms = LocationTerms(net, readout)(images).double().numpy()
    rebuilt = readout.bias + terms.sum(axis=1)
    error = float(np.abs(rebuilt - expected).max() / max(np.abs(expected).max(), 1e-12))
    if not error <= LINEARITY_TOLERANCE:
        raise NotDecomposableError(
            f"the embedding is not a sum of per-location terms (relative error {error:.1e}): "
            "the pooling or the head is not linear"
        )


class LocationTerms(nn.Module):
    """Images ``(B, 3, S, S)`` -> per-location embedding terms ``(B, G*G, D)`` on the common
    grid (row-major), whose sum plus ``readout.bias`` is the embedding before normalisation."""

    def __init__(self, net: EmbeddingNet, readout: Readout) -> None:
        super().__init__()
        self.net = net.eval()
        self.keys = [(s.trunk, s.stage) for s in readout.stages]
        # Per stage and location type: the type's (D, C) matrix, its locations, and how they
        # spread onto the grid. One small matmul per type: no (L, D, C) tensor is ever built.
        self.groups: list[list[tuple[str, str, str]]] = []
        for index, stage in enumerate(readout.stages):
            names = []
            for kind in range(len(stage.weights)):
                where = np.flatnonzero(stage.types == kind)
                name = f"s{index}t{kind}"
                self.register_buffer(f"{name}w", torch.from_numpy(stage.weights[kind]))
                self.register_buffer(f"{name}l", torch.from_numpy(where))
                self.register_buffer(f"{name}s", torch.from_numpy(
                    np.ascontiguousarray(stage.spread[:, where].T)))
                names.append((f"{name}w", f"{name}l", f"{name}s"))
            self.groups.append(names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for t, stages in enumerate(self.net.stages):
            wanted = [i for trunk, i in self.keys if trunk == t]
            x = images
            for i, stage in enumerate(stages[: max(wanted, default=-1) + 1]):
                x = stage(x)
                if (t, i) in self.keys:
                    term = self._terms(self.keys.index((t, i)), x)
                    total = term if total is None else total + term
        assert total is not None
        return total.transpose(1, 2)

    def _terms(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, G*G)`` for one stage: per location type, ``W @ x`` then the spread (plain
        MatMuls, which ONNX Runtime runs much faster than Einsum)."""
        flat = x.float().flatten(2)  # (B, C, L)
        total = None
        for weights, where, spread in self.groups[index]:
            chosen = flat.index_select(2, getattr(self, where))  # (B, C, l)
            per_location = torch.matmul(getattr(self, weights), chosen)  # (B, D, l)
            term = torch.matmul(per_location, getattr(self, spread))  # (B, D, M)
            total = term if total is None else total + term
        assert total is not None
        return total
