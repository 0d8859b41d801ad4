"""Make sure a Chromium for the page tests is installed (Debian's package), if we can.

Run by ``make test``. As root (CI), a missing browser is installed with apt-get; otherwise
the page tests say how to install it and skip (or fail, under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def main() -> int:
    if any(shutil.which(name) for name in CANDIDATES):
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(
            "note: no Chromium found; install Debian's 'chromium' to run the page tests",
            file=sys.stderr,
        )
        return 0
    print("installing Debian's chromium for the page tests ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env)
    if result.returncode != 0:
        print(
            "note: apt-get could not install chromium; the page tests will say so", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
