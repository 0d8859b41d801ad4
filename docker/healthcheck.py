"""Container health: GET /ready answers 200 (model and index loaded). Standard library only."""

import os
import sys
import urllib.request

port = os.environ.get("LOOKALIKE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
