"""Face generators behind one interface, and safe loaders for their public checkpoint formats.

`load_generator(path)` reads any supported checkpoint without executing anything in it;
`open_generator(spec)` also takes MODULE:CALLABLE, a generator of the user's own code.
One subpackage per family (`pgan`, `stylegan`, `stylegan2`, `glow`): each holds its networks
and the readers and writers of its public formats. `io` holds what the formats share (the
allow-list unpickler, format detection, the table of formats); `training` grows a PGAN.
"""
from patchscope.common.errors import CheckpointError
from patchscope.generators.base import Generator, StyleGenerator
from patchscope.generators.custom import open_generator
from patchscope.generators.io.formats import FORMATS, checkpoint_sha256, detect_format, load_generator

__all__ = ["Generator", "StyleGenerator", "CheckpointError", "FORMATS", "checkpoint_sha256",
           "detect_format", "load_generator", "open_generator"]
