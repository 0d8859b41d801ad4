"""Where and in which precision training runs: the torch device, autocast, a hardware label."""

from __future__ import annotations

import torch

from ..core.machine import cpu_description

__all__ = ["autocast", "device_for", "hardware"]


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 on a CPU (several-fold faster with AVX-512 BF16), fp16 AMP on a GPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_description()}"
