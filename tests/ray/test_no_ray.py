"""The single-machine path needs no Ray: the CLI, the app and the in-process build import none
of it (Ray is the optional ``lookalike[ray]`` extra). A fresh interpreter reports whether
``ray`` ended up in ``sys.modules`` (this test process may have it loaded already)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import lookalike.service.cli, lookalike.service.app, lookalike.service.serve
import lookalike.index.build, lookalike.index.sharding
from lookalike.service.cli import app
try:
    app(["index", "build", "--help"], prog_name="lookalike")
except SystemExit:
    pass
print("RAY" if "ray" in sys.modules else "NO-RAY")
"""


def test_the_single_machine_path_imports_no_ray() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip().endswith("NO-RAY"), result.stdout[-500:]
