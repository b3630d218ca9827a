"""Dataset folders of PNGs with a manifest, shared by sampled fakes and prepared reals.

Used by `generators.sampling` and `generators.prepare`, so real and fake sets are written alike:
atomic PNG writes, whole-file checks, and a manifest that refuses to mix settings in one folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchscope.common.atomic import replace_atomically
from patchscope.common.errors import DatasetError
from patchscope.common.runfolder import other_entries

MANIFEST = "manifest.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every whole PNG


def write_png(path: Path, pixels: np.ndarray | Image.Image) -> None:
    """uint8 H x W x 3 pixels (or an RGB image) to a PNG, atomically; same pixels, same bytes."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    replace_atomically(path, lambda file: image.save(file, format="PNG"))


def is_complete_png(path: Path) -> bool:
    """A PNG that ends with its IEND chunk. Files written by `write_png` are whole or absent; this
    also catches a truncated file copied in from elsewhere."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            file.seek(0, os.SEEK_END)
            if file.tell() < 20:
                return False
            file.seek(-8, os.SEEK_END)
            return head == PNG_SIGNATURE and file.read(8) == PNG_END
    except OSError:
        return False


def remove_stale_temps(folder: Path) -> int:
    """Delete temporary files an interrupted `write_png` left behind; returns how many."""
    stale = [p for p in folder.glob(".*.png.*.tmp") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def resize_lanczos(image: Image.Image, size: int | None) -> Image.Image:
    """Pillow Lanczos to `size` x `size` (the paper's working-size resize), or as is."""
    if size is None or image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS)


def plain_json(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so recorded and requested settings compare."""
    return json.loads(json.dumps(value))


def read_manifest(out: Path, kind: str) -> dict[str, Any]:
    """The manifest of a dataset folder of this kind ({} for a new or empty folder). A non-empty
    folder without one, or one made by the other command, may hold someone else's files: refused."""
    path = out / MANIFEST
    if not path.is_file():
        if other_entries(out):  # leftovers of a crashed manifest write do not make the folder someone else's
            raise DatasetError(f"{out}: not empty and has no {MANIFEST}; choose an empty or new folder")
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable manifest ({error}); move the folder away or fix the file") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else None
        raise DatasetError(f"{path}: a manifest of kind {found!r}, not {kind!r}; choose another folder")
    return manifest


def write_manifest(out: Path, manifest: Mapping[str, Any]) -> Path:
    text = json.dumps(manifest, indent=2) + "\n"
    replace_atomically(out / MANIFEST, lambda file: file.write(text.encode()))
    return out / MANIFEST


def check_same_settings(out: Path, recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the first differing setting, to add to a folder made with other
    settings; None on either side of a `*_sha256` key means "not known" and is not compared."""
    for key, value in plain_json(dict(requested)).items():
        old = recorded.get(key)
        if key.endswith("_sha256") and (old is None or value is None):
            continue
        while isinstance(old, dict) and isinstance(value, dict) and old != value:
            sub = next(k for k in [*value, *old] if old.get(k) != value.get(k))
            key, old, value = f"{key}.{sub}", old.get(sub), value.get(sub)
        if old != value:
            raise DatasetError(f"{out}: made with {key}={_short(old)}, asked for {key}={_short(value)}; "
                               f"use a new --out folder (existing images are never replaced)")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."
