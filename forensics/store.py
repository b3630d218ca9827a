"""The prepared image store: images decoded and Lanczos-resized once, kept as memory-mapped uint8 on disk.

`forensics.data.ImageSet(store=DIR)` reads through it (`patchscope train/eval --store DIR`), so later runs and
epochs take views of the stored arrays instead of decoding PNG/JPEG files and resizing them again.

Layout: DIR/<settings>/seg-<id>/{pixels.u8, index.json}. <settings> names what the pixels depend on besides
the source file (the load size, this module's decoder version and Pillow's version), so a changed setting
finds an empty folder and everything is decoded again. A segment is immutable: `pixels.u8` holds its images
back to back (H x W x 3 each), `index.json` each entry's source path, size, mtime_ns and content digest (the
file's key), its offset and shape, or the reason it could not be read (a skipped file, so the skip and its
warning line come back without decoding it again). A segment is written in a hidden temporary folder, fsynced
and renamed into place, so one cut short (a kill, a full disk, an exception) is never read; the entries of
a source file whose size, mtime or content changed no longer match and only those are decoded again, into a
new segment. Segments only grow: delete the folder to reclaim the space of stale entries.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import PIL

from patchscope.common.errors import InputError

log = logging.getLogger("patchscope.data")

FORMAT = "patchscope-image-store"
DECODER_VERSION = 1  # raise when read_image or resize_image change what they return: old stores are then unused
SEGMENT_BYTES = 1 << 30  # a long build commits a segment every GiB: an interrupted one keeps what it finished
FULL_HASH_BYTES = 1 << 20  # files up to this size are hashed whole; larger ones by three sampled windows
SAMPLE_BYTES = 1 << 18
STALE_TEMP_SECONDS = 24 * 3600  # a temporary folder this old is an abandoned build, not one in progress
PIXELS, INDEX = "pixels.u8", "index.json"

# (size, mtime_ns, digest) of a source file; None when it cannot be read as a regular file.
Fingerprint = tuple[int, int, str]
# Where one stored image lies: (segment folder name, byte offset, height, width).
Ref = tuple[str, int, int, int]
# What `fetch` gives per path: (ref or None, original (width, height) or None, failure reason or None).
Outcome = tuple[Ref | None, tuple[int, int] | None, str | None]


def settings_folder(root: str | os.PathLike, load_size: int | None) -> Path:
    """The folder of one load size (and decoder): its name says the size and hashes everything else."""
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise InputError(f"setting store={root!r}: expected a folder path for the image store")
    settings = {"format": FORMAT, "decoder": DECODER_VERSION, "pillow": PIL.__version__, "load_size": load_size}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"load{load_size if load_size is not None else 'none'}-{digest}"


def fingerprint(path: str | os.PathLike) -> Fingerprint | None:
    """Size, mtime_ns and a BLAKE2 digest of the content (whole up to 1 MiB, else its start, middle and end)."""
    try:  # O_NONBLOCK: a FIFO must not wait for a writer; it is refused by the fstat below
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            digest = hashlib.blake2b(digest_size=20)
            if info.st_size <= FULL_HASH_BYTES:
                digest.update(handle.read())
            else:
                for start in (0, (info.st_size - SAMPLE_BYTES) // 2, info.st_size - SAMPLE_BYTES):
                    handle.seek(start)
                    digest.update(handle.read(SAMPLE_BYTES))
        return info.st_size, info.st_mtime_ns, digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _key(path: str | os.PathLike, print_: Fingerprint | None) -> tuple | None:
    return None if print_ is None else (os.path.abspath(path), *print_)


# ----------------------------------------------------------------------------- reading

def _read_segment(folder: Path) -> list[dict[str, Any]]:
    """The entries of a committed segment; a segment that does not check out is left unused, with a warning."""
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("decoder") != DECODER_VERSION:
            raise ValueError("written by another version")
        size = (folder / PIXELS).stat().st_size
        if size != index["bytes"]:
            raise ValueError(f"{PIXELS} holds {size} bytes, its index says {index['bytes']}")
        entries = index["entries"]
        for entry in entries:
            if "skipped" not in entry and entry["offset"] + entry["height"] * entry["width"] * 3 > size:
                raise ValueError("an entry lies past the end of its pixels")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("image store: ignoring segment %s (%s); its images will be decoded again", folder, exc)
        return []


def known_entries(folder: Path) -> dict[tuple, Outcome]:
    """Every committed entry under a settings folder, by (absolute path, size, mtime_ns, digest)."""
    known: dict[tuple, Outcome] = {}
    if not folder.is_dir():
        return known
    for segment in sorted(folder.iterdir()):
        if not segment.name.startswith("seg-") or not segment.is_dir():
            continue  # hidden .seg-*.tmp folders are builds in progress or cut short: never read
        for entry in _read_segment(segment):
            key = (entry["path"], entry["size"], entry["mtime_ns"], entry["digest"])
            if "skipped" in entry:
                known[key] = (None, None, str(entry["skipped"]))
            else:
                known[key] = ((segment.name, entry["offset"], entry["height"], entry["width"]),
                              tuple(entry["original"]), None)
    return known


class StoredPixels:
    """Stored images by ref, read through one read-only memory map per segment, opened on first use.

    Pickles without its maps (DataLoader workers under spawn/forkserver reopen them), never with the pixels.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.refs: list[Ref] = []
        self._maps: dict[str, np.ndarray] = {}

    def append(self, ref: Ref) -> None:
        self.refs.append(ref)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 H x W x 3, a read-only view of the map."""
        segment, offset, height, width = self.refs[index]
        pixels = self._maps.get(segment)
        if pixels is None:
            pixels = self._maps[segment] = np.memmap(self.folder / segment / PIXELS, dtype=np.uint8, mode="r")
        return pixels[offset:offset + height * width * 3].reshape(height, width, 3)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "refs": self.refs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.refs, self._maps = state["folder"], state["refs"], {}


# ----------------------------------------------------------------------------- writing

def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """Appends decoded images to a temporary segment and commits it (fsync, then rename) every SEGMENT_BYTES
    and on a clean exit; an exception, a kill or a GeneratorExit leaves only the hidden temporary folder."""

    def __init__(self, folder: Path, load_size: int | None, segment_bytes: int | None = None):
        self.folder, self.load_size = folder, load_size
        self.segment_bytes = segment_bytes if segment_bytes is not None else SEGMENT_BYTES
        self.committed: list[str] = []
        self._name: str | None = None

    def __enter__(self) -> SegmentWriter:
        return self  # nothing is created until the first entry: a complete store may be read-only

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self._commit()
        else:
            self._discard()

    def _remove_abandoned(self) -> None:
        now = time.time()
        for temp in self.folder.glob(".seg-*.tmp"):
            with contextlib.suppress(OSError):
                if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(temp)

    def _open(self) -> None:
        name = f"seg-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self._temp = self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned()
            self._temp.mkdir()
        except (PermissionError, FileExistsError, NotADirectoryError) as exc:
            raise InputError(f"{self.folder}: cannot write the image store there ({exc.strerror}); "
                             "choose another store folder (--store)") from None
        self._name = name
        self._pixels = open(self._temp / PIXELS, "wb")
        self._entries: list[dict[str, Any]] = []
        self._bytes = 0

    def add(self, path: str | os.PathLike, print_: Fingerprint | None, pixels: np.ndarray | None,
            original: tuple[int, int] | None, reason: str | None) -> Ref | None:
        """Record one file: its pixels (returns where they will lie) or the reason it could not be read.
        A file without a fingerprint is stored for this run only: no later lookup can match it."""
        if self._name is None:
            self._open()
        size, mtime_ns, digest = print_ if print_ is not None else (-1, -1, "")
        entry: dict[str, Any] = {"path": os.path.abspath(path), "size": size, "mtime_ns": mtime_ns, "digest": digest}
        ref = None
        if reason is not None:
            entry["skipped"] = reason
        else:
            pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
            height, width = pixels.shape[:2]
            entry.update(offset=self._bytes, height=height, width=width, original=list(original))
            self._pixels.write(pixels.tobytes())
            ref = (self._name, self._bytes, height, width)
            self._bytes += pixels.nbytes
        self._entries.append(entry)
        if self._bytes >= self.segment_bytes:
            self._commit()
        return ref

    def _commit(self) -> None:
        if self._name is None:
            return
        self._pixels.flush()
        os.fsync(self._pixels.fileno())
        self._pixels.close()
        index = {"format": FORMAT, "decoder": DECODER_VERSION, "pillow": PIL.__version__,
                 "load_size": self.load_size, "bytes": self._bytes, "entries": self._entries}
        with open(self._temp / INDEX, "w", encoding="utf-8") as handle:
            json.dump(index, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_folder(self._temp)
        os.replace(self._temp, self.folder / self._name)  # the commit: only now can a lookup see it
        _fsync_folder(self.folder)
        self.committed.append(self._name)
        self._name = None

    def _discard(self) -> None:
        if self._name is None:
            return
        with contextlib.suppress(OSError):
            self._pixels.close()
        shutil.rmtree(self._temp, ignore_errors=True)
        self._name = None


# ----------------------------------------------------------------------------- fetching

def fetch(root: str | os.PathLike, paths: Sequence[Path], load_size: int | None, run: Callable,
          decode: Callable[[Path], tuple[np.ndarray | None, tuple[int, int] | None, str | None]],
          progress: Callable[[Iterable], Iterable] = iter) -> Iterator[Outcome]:
    """One outcome per path, in order: stored entries as they are, the others decoded by `run(decode, paths)`
    (a `map`-like runner, e.g. a process pool) and written to a new segment as they come.

    Close it before the end (`contextlib.closing`, as an exception in the consumer does) and the segment being
    written is discarded.
    """
    folder = settings_folder(root, load_size)
    prints = list(run(fingerprint, paths))
    known = known_entries(folder)
    found = [known.get(_key(path, print_)) for path, print_ in zip(paths, prints)]
    missing = [i for i, outcome in enumerate(found) if outcome is None]
    reused = len(paths) - len(missing)
    if missing:
        log.info("image store %s: %d of %d images stored, decoding %d", folder, reused, len(paths), len(missing))
    with SegmentWriter(folder, load_size) as writer:
        decoded = iter(progress(run(decode, [paths[i] for i in missing])))
        for i, path in enumerate(paths):
            if found[i] is None:
                image, original, reason = next(decoded)
                found[i] = (writer.add(path, prints[i], image, original, reason), original, reason)
            yield found[i]
