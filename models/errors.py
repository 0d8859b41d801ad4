"""Errors shared by the torch-free and the torch parts of ``models``."""


class BundleError(ValueError):
    """A model bundle that is missing, incomplete, corrupt or inconsistent."""
