"""Checking what a torch file declares before `torch.load` allocates it: zip members against the archive,
storage sizes against their records (zip) or the bytes that follow (legacy), constructions in its pickles.

Used by `generators.io.safe_pickle` for torch files and for the tensor bytes NVlabs pickles embed.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import warnings
import zipfile
from typing import Any, BinaryIO

import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.io.bounds import MAX_EXPANSION_BYTES, Budget, sized

# torch stores archive members uncompressed; a member may expand to at most this many times the archive
# (a recompressed checkpoint of zeros still fits; a zip bomb does not).
MAX_ZIP_RATIO = 16
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class BoundedReader:
    """A binary handle whose reads may not ask for more bytes than remain: a pickle declaring a 4 GiB
    string in a 40-byte file is refused before a buffer of that size is made."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self.size = size
        self.position = 0

    @property
    def remaining(self) -> int:
        return self.size - self.position

    def _take(self, n: int) -> None:
        if n > self.remaining:
            raise pickle.UnpicklingError(f"wants {n} bytes where {self.remaining} remain (truncated, or a "
                                         "declared length the file cannot hold)")

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n is None or n < 0 else n
        self._take(n)
        data = self._handle.read(n)
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        self._take(len(buffer))
        count = self._handle.readinto(buffer)
        self.position += count or 0
        return count

    def readline(self) -> bytes:
        data = self._handle.readline(self.remaining)
        self.position += len(data)
        return data


def stream_size(handle: BinaryIO) -> int:
    """Bytes left in a seekable handle."""
    here = handle.tell()
    end = handle.seek(0, io.SEEK_END)
    handle.seek(here)
    return end - here


class _Call:
    """What a scanned pickle would construct: the callable's name and its arguments, nothing run."""

    def __init__(self, qualname: str, args: tuple) -> None:
        self.qualname, self.args, self.state = qualname, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Storage:
    def __init__(self, key: str, nbytes: int) -> None:
        self.key, self.nbytes = key, nbytes


def _element_size(storage_type: Any) -> int:
    name = getattr(storage_type, "stand_in_name", "")
    if name == "UntypedStorage":
        return 1
    cls = getattr(torch, name, None) if name.endswith("Storage") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation
        dtype = getattr(cls, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"unknown storage type {name or storage_type!r}")
    return dtype.itemsize


# Constructions torch's weights-only unpickler allows that allocate in proportion to an argument.
_COPIES_ARGUMENT = {"builtins.set", "builtins.frozenset", "collections.OrderedDict", "collections.Counter",
                    "torch.Size", "_codecs.encode"}


def _load_bytearray8(self: Any) -> None:
    # pickle's own BYTEARRAY8 allocates the declared length before reading it
    (length,) = struct.unpack("<Q", self.read(8))
    if length > self.reader.size:
        raise pickle.UnpicklingError(f"a bytearray declares {length} bytes in a {self.reader.size}-byte file")
    data = bytearray(length)
    self.readinto(data)
    self.append(data)


BOUNDED_DISPATCH = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: _load_bytearray8}


class _Scanner(pickle._Unpickler):
    """Reads a pickle into inert `_Call`s (nothing imported, nothing called) and checks, as each is made,
    what torch's loader would allocate for it; storages come back as `_Storage`s of their declared size."""

    dispatch = BOUNDED_DISPATCH

    def __init__(self, reader: BoundedReader, budget: Budget) -> None:
        super().__init__(reader, encoding="latin1")
        self.reader, self.budget = reader, budget
        self.storages: dict[str, _Storage] = {}
        self._types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, mapped as torch's own unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key not in self._types:
            qualname, scanner = f"{module}.{name}", self

            def __new__(cls: type, *args: Any, **kwargs: Any) -> _Call:
                scanner.check_call(qualname, args)
                return _Call(qualname, args)

            self._types[key] = type(f"Scanned[{qualname}]", (), {"__new__": __new__, "stand_in_name": name})
        return self._types[key]

    def check_call(self, qualname: str, args: tuple) -> None:
        first = args[0] if args else None
        if qualname == "builtins.bytearray":
            self.budget.charge(first if isinstance(first, int) else sized(first), "a bytearray")
        elif qualname in _COPIES_ARGUMENT:
            self.budget.charge(sized(first), qualname)
        elif qualname == "torch._utils._rebuild_qtensor" and len(args) > 2 and isinstance(first, _Storage):
            # allocates its full size before viewing the storage
            size = args[2] if isinstance(args[2], (tuple, list)) else ()
            declared = math.prod(int(s) for s in size if isinstance(s, int))
            if declared > first.nbytes + MAX_EXPANSION_BYTES:
                raise pickle.UnpicklingError(f"a quantized tensor declares {declared} values over "
                                             f"{first.nbytes} bytes of storage")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            return None
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"storage {key!r} declares {numel!r} elements")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, numel * _element_size(storage_type))
        return self.storages[key]


def _scan(data: bytes, source: str) -> _Scanner:
    scanner = _Scanner(BoundedReader(io.BytesIO(data), len(data)), Budget.for_file(len(data), source))
    scanner.load()
    return scanner


def check_zip(handle: BinaryIO, size: int, source: str) -> None:
    """Refuse a torch zip archive whose members expand past MAX_ZIP_RATIO times the archive, whose pickle
    builds something large, or whose storages declare more bytes than their records hold."""
    with zipfile.ZipFile(handle) as archive:
        members = archive.infolist()
        declared = sum(m.file_size for m in members)
        if declared > MAX_ZIP_RATIO * size + (64 << 20):
            raise CheckpointError(f"{source}: its zip members expand to {declared} bytes from a {size}-byte "
                                  "archive (a zip bomb?); refused before reading them")
        records = {m.filename: m for m in members}
        pickles = [name for name in records if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            return  # not a torch archive: torch.load says so
        prefix = pickles[0][: -len("data.pkl")]
        scanner = _scan(archive.read(pickles[0]), source)
    for storage in scanner.storages.values():
        record = records.get(f"{prefix}data/{storage.key}")
        held = record.file_size if record is not None else 0
        if storage.nbytes > held:
            raise CheckpointError(f"{source}: storage {storage.key!r} declares {storage.nbytes} bytes but its "
                                  f"record holds {held}; refused before allocating")


def check_legacy(handle: BinaryIO, size: int, source: str) -> int:
    """Declared storage bytes of a legacy (pre-zip) torch stream, refused when they exceed the bytes that
    follow its pickles (where the legacy format keeps them); the handle is left where it was."""
    start = handle.tell()
    reader = BoundedReader(handle, size)
    budget = Budget.for_file(size, source)
    scanners = []
    try:
        for index in range(5):  # magic number, protocol, system info, the object, the storage keys
            scanners.append(_Scanner(reader, budget))
            value = scanners[-1].load()
            if index == 0 and value != LEGACY_MAGIC:
                return 0  # not a legacy torch stream: torch.load refuses it after this first pickle
    finally:
        handle.seek(start)
    storages = {k: s for scanner in scanners for k, s in scanner.storages.items()}
    declared = sum(s.nbytes + 8 for s in storages.values())  # each record: an 8-byte count, then the data
    if declared > reader.remaining:
        raise CheckpointError(f"{source}: its storages declare {declared} bytes but only {reader.remaining} "
                              "follow; refused before allocating")
    return declared


def check_torch_stream(handle: BinaryIO, source: str) -> int:
    """`check_zip` or `check_legacy` on a seekable handle (position kept); returns the storage bytes
    a legacy stream declares (0 for a zip, whose storages are checked against their records).
    A stream that cannot be scanned is not a readable torch checkpoint: CheckpointError."""
    size = stream_size(handle)
    start = handle.tell()
    magic = handle.read(4)
    handle.seek(start)
    try:
        if magic == b"PK\x03\x04":
            check_zip(handle, size, source)
            return 0
        return check_legacy(handle, size, source)
    except CheckpointError:
        raise
    except Exception as error:  # truncated or garbled: its own fault, named in one line
        text = str(error).splitlines()[0][:120] if str(error).strip() else ""
        raise CheckpointError(f"{source}: not a readable torch checkpoint ({type(error).__name__}"
                              f"{': ' + text if text else ''})") from None
    finally:
        handle.seek(start)
