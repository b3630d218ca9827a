"""Errors for unreadable or unsafe generator checkpoints, shown by the CLI as one line (exit 2)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, of an unknown format, truncated, or refused as unsafe."""
