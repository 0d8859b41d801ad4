"""The errors of ``models``, each a kind of :class:`~lookalike.core.errors.LookalikeError`.

They live here, apart from the torch code that raises most of them, so that the CLI and the
service can name them without importing torch.
"""

from __future__ import annotations

from ..core.errors import InvalidInputError

__all__ = ["BackboneError", "BundleError", "ConfigError", "EngineError"]


class BundleError(InvalidInputError):
    """A model bundle or serving model that is missing, incomplete, corrupt or inconsistent."""


class ConfigError(InvalidInputError):
    """A model or training configuration that cannot be built."""


class BackboneError(InvalidInputError):
    """An unknown backbone name or weights that cannot be loaded."""


class EngineError(InvalidInputError):
    """An unknown engine, one whose package is not installed, or a conversion that drifted."""
