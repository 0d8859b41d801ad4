"""lookalike: retrieval of images that look alike.

The code lives in the top-level folders the product card names (``models/``, ``index/``,
``service/``); the package map in ``pyproject.toml`` installs them as ``lookalike.models``,
``lookalike.index`` and ``lookalike.service``.
"""

__version__ = "0.1.0"
