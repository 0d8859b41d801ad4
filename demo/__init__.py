"""The bundled demo set: 100 "Totally Looks Like" pairs (``tll/left``, ``tll/right``,
``tll/pairs.csv``), copied from the shared data by ``scripts/make_demo_set.py``."""

from pathlib import Path

DEMO_IMAGES = Path(__file__).parent / "tll"
