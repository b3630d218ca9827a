"""Errors for unreadable or unsafe generator checkpoints and unusable dataset folders.

Raised by the loaders, sampling and real-image preparation; the CLI shows them as one line (exit 2).
"""


class CheckpointError(ValueError):
    """A checkpoint that is missing, of an unknown format, truncated, or refused as unsafe."""


class DatasetError(ValueError):
    """A dataset folder or its inputs that cannot be used as asked: a manifest that disagrees with
    the request (other generator, options, seed or size), a missing source, no readable images."""
