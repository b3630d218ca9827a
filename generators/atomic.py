"""Crash-safe file writes for the generator layer: a temporary name in the same folder, then rename.

Used by sampling, GAN training and the zoo checkpoint writer (`generators` may not import `forensics`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write` to a temporary name beside `path`, then rename over it,
    so a crash never leaves half a file under the final name."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
