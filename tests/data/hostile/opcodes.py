"""Writing hostile pickles by hand: a few protocol-2 opcodes, a re-pickler for safely loaded records, torch zips.

Used by `make_hostile.py`. Nothing here unpickles anything; each function returns the bytes of a file.
"""
from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchscope.generators.io.safe_pickle import PickledRecord

PROTO = b"\x80\x02"


def glob(module: str, name: str) -> bytes:
    """GLOBAL: push `module.name` (what the unpickler's find_class resolves)."""
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"X" + len(data).to_bytes(4, "little") + data


def raw(value: bytes) -> bytes:
    return b"B" + len(value).to_bytes(4, "little") + value


def integer(value: int) -> bytes:
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


FALSE, TRUE, NONE = b"\x89", b"\x88", b"N"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: `func(*args)`."""
    return func + tup(*args) + b"R"


def mapping(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}" + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def build(obj: bytes, state: bytes) -> bytes:
    """BUILD: `obj.__setstate__(state)`, or its `__dict__` updated from a dict state."""
    return obj + state + b"b"


def pickle_of(body: bytes) -> bytes:
    return PROTO + body + b"."


# ---------------------------------------------------------------------------------------------- payloads

def shell_touch(canary: Path) -> str:
    return f"touch '{canary}'"


def python_touch(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').write('ran')"


def import_os() -> bytes:
    return call(glob("builtins", "__import__"), text("os"))


# ---------------------------------------------------------------------------------------------- re-pickling

class _Global:
    """A name the re-pickler writes as a GLOBAL opcode, never importing it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # save_reduce asks for a callable; this one is never called
        raise TypeError(f"{self.module}.{self.name} is only a name")


class _Repickler(pickle._Pickler):
    """Writes safely loaded records back as the pickle they came from: each `PickledRecord` as a call of
    its global (or a BUILD of its state), with `replace(record)` given the chance to edit records first."""

    def __init__(self, file: Any, replace: Any) -> None:
        super().__init__(file, protocol=2)
        self.replace = replace

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, _Global):
            self.write(glob(obj.module, obj.name))
            return
        super().save(obj, save_persistent_id)

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, PickledRecord):
            return NotImplemented
        obj = self.replace(obj)
        items = iter(obj.dict_items.items()) if obj.dict_items else None
        listed = iter(obj.items) if obj.items else None
        return _Global(obj.module, obj.name), obj.args, obj.state, listed, items


def repickle(obj: Any, replace: Any = lambda record: record) -> bytes:
    buffer = io.BytesIO()
    _Repickler(buffer, replace).dump(obj)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- torch zips

def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A `torch.save` archive (what `torch.load` reads) holding `data_pkl` and the storage `records`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def storage_ref(key: str, numel: int) -> bytes:
    """The persistent id torch.save writes for a float storage: ('storage', FloatStorage, key, 'cpu', numel)."""
    return tup(text("storage"), glob("torch", "FloatStorage"), text(key), text("cpu"), integer(numel)) + b"Q"


def tensor_of(storage: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage, integer(offset),
                tup(*map(integer, size)), tup(*map(integer, stride)), FALSE, call(glob("collections", "OrderedDict")))


def legacy_storage_bytes(values: int = 4) -> bytes:
    """A storage as NVlabs pickles embed it: legacy `torch.save` bytes for `torch.storage._load_from_bytes`."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage's deprecation: NVlabs files hold them
        torch.save(torch.zeros(values).storage(), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def object_dtype() -> bytes:
    """`numpy.dtype('O8', False, True)`: an object dtype, as numpy pickles one."""
    return call(glob("numpy", "dtype"), text("O8"), FALSE, TRUE)


def forged_object_array(reconstruct_module: str) -> bytes:
    """An object array whose 'objects' are raw bytes: 8 bytes a trusting loader would take as a pointer."""
    empty = call(glob(reconstruct_module, "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), raw(b"b"))
    state = tup(integer(1), tup(integer(1)), object_dtype(), FALSE, raw(b"\x41" * 8))
    return build(empty, state)


def float32(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()
