"""Inference engines: one registry, name -> factory(bundle) -> run(batch) -> embeddings.

An engine takes a preprocessed float32 batch ``(B, 3, S, S)`` and returns float32 embeddings
``(B, D)``. Add one with :func:`register_engine`; the service and the CLI pick it by name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .bundle import ModelBundle

__all__ = ["ENGINES", "EngineError", "register_engine"]


class EngineError(ValueError):
    """An unknown engine, or one whose package is not installed."""


Engine = Callable[[np.ndarray], np.ndarray]
EngineFactory = Callable[[ModelBundle], Engine]
ENGINES: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    def decorator(factory: EngineFactory) -> EngineFactory:
        ENGINES[name] = factory
        return factory

    return decorator


@register_engine("torch")
def torch_engine(bundle: ModelBundle) -> Engine:
    """Eager PyTorch fp32 in channels_last layout: the reference engine."""
    net = bundle.net.eval().to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return net(tensor).float().numpy()

    return run
