"""The machine a figure was measured on: benchmarks, CV runs and bundles all name it the same way.

Machines differ from session to session (AVX2 only, AVX-512, VNNI, AMX), and a speed figure
without its CPU cannot be compared with anything, so every figure carries this line.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["SIMD_FLAGS", "cpu_description"]

#: The instruction-set extensions that change how fast FAISS, BLAS and ONNX Runtime run.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def cpu_description() -> str:
    """``model name (flags), N cores`` from ``/proc/cpuinfo``; ``platform`` where it is absent."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    marks = ", ".join(flag for flag in SIMD_FLAGS if flag in flags)
    return f"{model} ({marks}), {os.cpu_count()} cores" if marks else \
        f"{model}, {os.cpu_count()} cores"
