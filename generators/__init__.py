"""Face generators behind one interface, and safe loaders for their public checkpoint formats.

`load_generator(path)` reads any supported checkpoint without executing anything in it.
"""
from generators.base import Generator, StyleGenerator
from generators.errors import CheckpointError
from generators.formats import FORMATS, checkpoint_sha256, detect_format, load_generator

__all__ = ["Generator", "StyleGenerator", "CheckpointError", "FORMATS", "checkpoint_sha256",
           "detect_format", "load_generator"]
