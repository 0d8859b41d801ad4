"""The single-machine path needs no Ray: the CLI, the app and the in-process build import none
of it (Ray is the optional ``lookalike[ray]`` extra). A fresh interpreter reports whether
``ray`` ended up in ``sys.modules`` (this test process may have it loaded already)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
from pathlib import Path
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


BLOCKED = """
import sys
from pathlib import Path
sys.modules["ray"] = None  # as if the extra were not installed: `import ray` fails
from lookalike.service.cli import main
sys.argv = ["lookalike", *sys.argv[1:]]
main()
"""


def test_ray_options_without_the_extra_say_what_to_install(tmp_path: Path, demo_dir: Path) -> None:
    for args in (["index", "build", str(demo_dir), "--out", str(tmp_path / "i"), "--ray"],
                 ["serve", "--index", str(tmp_path / "i"), "--ray", "--port", "8599"]):
        result = subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            "error: --ray needs Ray (ray is not installed): pip install 'lookalike[ray]'"
        )
