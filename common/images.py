"""Image input for every command: one safe decoder (upright 8-bit RGB, one error type) and one folder walker.

Used by forensics.data (train, eval, patches, spectra, invert, retrain), generators.prepare and generators.training.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchscope.common.errors import InputError
from patchscope.common.userfiles import NotRegularFile, open_regular

log = logging.getLogger("patchscope.images")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})  # compare lower-cased
EXIF_ORIENTATION = 0x0112
# What each EXIF orientation asks for, ImageOps.exif_transpose's table: one copy here so that image_size
# (no pixels) and read_image agree, and a malformed EXIF block cannot fail a good image when the
# orientation is written back (exif_transpose rewrites the block; the pixels are all we keep).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
SWAPS_SIDES = frozenset({5, 6, 7, 8})  # orientations that turn the stored image by 90 degrees


class BadImageError(InputError):
    """An image file that cannot be decoded: corrupt, truncated, empty, not a regular file or not an image."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None and _WORKER_TRACEBACK in str(path):
            path, reason = _from_worker_traceback(str(path))
        reason = reason or "unreadable image"
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason

    def __reduce__(self):  # keep (path, reason) across process boundaries
        return type(self), (self.path, self.reason)


# torch's DataLoader re-raises a worker's exception as `type(message)`, the message being its whole traceback
# text: a BadImageError built that way takes (path, reason) back from the traceback's last line, so the
# command still stops with one line naming the file.
_WORKER_TRACEBACK = "\nOriginal Traceback"


def _from_worker_traceback(text: str) -> tuple[str, str | None]:
    last = text.rstrip().splitlines()[-1]  # "patchscope.common.images.BadImageError: PATH: REASON"
    message = last.partition(f"{BadImageError.__name__}: ")[2] or last
    path, _, reason = message.partition(": ")
    return path, reason or None


# ----------------------------------------------------------------------------- opening

def _open_regular(path: Path) -> BinaryIO:
    """The file for reading (`userfiles.open_regular`: a FIFO never blocks), refused unless regular and non-empty."""
    try:
        handle, info = open_regular(path)
    except NotRegularFile as err:
        raise BadImageError(path, f"not a regular file: {err.kind}") from None
    if info.st_size == 0:
        handle.close()
        raise BadImageError(path, "empty file (0 bytes)")
    return handle


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Pillow's lazy image of a regular file; whatever goes wrong inside becomes one BadImageError line."""
    path = Path(path)
    try:
        with _open_regular(path) as handle, Image.open(handle) as image:
            yield image
    except BadImageError:
        raise
    except FileNotFoundError as exc:
        raise BadImageError(path, "file not found") from exc
    except PermissionError as exc:
        raise BadImageError(path, "permission denied") from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not an image file (Pillow cannot identify it)") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise BadImageError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright); an unreadable EXIF block counts as upright, as it always did."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: the pixels are still good
        return 1


# ----------------------------------------------------------------------------- decoding

def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode fully (so truncated files fail here), upright by the EXIF orientation, as uint8 H x W x 3 RGB.

    16-bit and 32-bit grey are rescaled to 0..255 (Pillow's own conversion clips them to white);
    float grey is taken as [0, 1] unless its values exceed 1; alpha is dropped, palettes expanded.
    """
    path = Path(path)
    with open_image(path) as image:
        image.load()
        method = UPRIGHT.get(_orientation(image))
        if method is not None:  # a phone's portrait JPEG is stored sideways, with orientation 6
            image = image.transpose(method)
        return to_rgb(image, path)


def to_rgb(image: Image.Image, path: str | os.PathLike = "image") -> np.ndarray:
    """A decoded Pillow image of any mode as uint8 H x W x 3 RGB (see read_image)."""
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are [0, 1] by convention unless their values say they are [0, 255].
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    else:
        if image.mode == "P" and "transparency" in image.info:
            # The same colours as a direct RGB conversion, without Pillow's warning that RGB cannot carry
            # the transparency (the alpha is dropped anyway).
            image = image.convert("RGBA")
        try:  # L, LA, 1, P, PA, RGBA (alpha dropped, not composited), CMYK, YCbCr...
            return np.array(image.convert("RGB"), dtype=np.uint8)
        except ValueError as exc:
            raise BadImageError(path, f"unsupported colour mode {image.mode}") from exc
    return np.repeat(gray[..., None], 3, axis=2)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image read_image would return, checked without decoding the pixels.

    Pillow's verify walks the file (it catches truncated PNGs cheaply) but leaves the image unusable,
    so the orientation is read from a second opening.
    """
    with open_image(path) as image:
        image.verify()
    with open_image(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in SWAPS_SIDES else (width, height)


# ----------------------------------------------------------------------------- walking

def walk_images(root: str | os.PathLike, suffixes: Collection[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files under `root` whose lower-cased suffix is in `suffixes`: names sorted within each folder,
    a folder's files before its subfolders, hidden entries skipped.

    Links to folders are followed (datasets are often assembled from links to other disks), but each
    real folder, known by (st_dev, st_ino), is visited once: a link back to a parent, or a second
    link to a folder already walked, is skipped and named in the log instead of repeating its images
    (or, for a loop, repeating them until memory runs out). Files are listed whatever they are; the
    decoder refuses FIFOs and devices, so they show up as unreadable, not as a hang.
    """
    root = Path(root)
    seen = {_identity(root)}
    skipped: list[str] = []
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):  # .ipynb_checkpoints and the like
            identity = _identity(Path(folder, name))
            if identity is None or identity in seen:
                skipped.append(os.path.join(folder, name))
                continue
            seen.add(identity)
            kept.append(name)
        dirs[:] = kept  # os.walk descends into these only, in this order
        # "._name.png" (macOS resource forks) and other hidden files are not data.
        found += [Path(folder, name) for name in sorted(files)
                  if not name.startswith(".") and Path(name).suffix.lower() in suffixes]
    if skipped:
        log.warning("%s: skipped %d linked folder(s) already walked or unreachable (a link loop or a second "
                    "link to one folder), e.g. %s", root, len(skipped), skipped[0])
    return found


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        info = folder.stat()  # follows links: the folder a link names
    except OSError:
        return None
    return info.st_dev, info.st_ino
