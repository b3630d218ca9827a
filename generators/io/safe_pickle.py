"""Reading foreign checkpoints without running them: an allow-list unpickler and a guarded torch.load.

Used by `generators.io.formats` and every format loader (PGAN, StyleGAN, StyleGAN2, Glow).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch

from patchscope.common.errors import CheckpointError

__all__ = ["PickledRecord", "BaseConfig", "load_pickle", "load_torch", "is_zip_file", "describe_source"]


class PickledRecord:
    """Inert stand-in for an object whose class or factory is not on the allow-list.

    It keeps what the pickle said about the object and nothing else: the qualified
    name of the class or callable, the arguments it would have been called with, the
    state `__setstate__` would have received, and any list or dict items appended to it.
    """

    def __init__(self, module: str, name: str, args: tuple = (), kwargs: dict | None = None,
                 state: Any = None) -> None:
        self.module = module
        self.name = name
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.state = state
        self.items: list[Any] = []
        self.dict_items: dict[Any, Any] = {}

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    # The unpickler's BUILD, SETITEMS and APPENDS opcodes call these three protocols.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.items.extend(values)

    def attr(self, name: str, default: Any = None) -> Any:
        """`name` from the dict state (or the dict half of a `(dict, slots)` state), else `default`."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            for part in state:
                if isinstance(part, dict) and name in part:
                    return part[name]
            return default
        if isinstance(state, dict):
            return state.get(name, default)
        return default

    def __repr__(self) -> str:
        if isinstance(self.state, dict):
            keys = list(self.state)[:6]
            state = f"state keys {keys}{'...' if len(self.state) > 6 else ''}"
        else:
            state = f"state {type(self.state).__name__}"
        return f"PickledRecord({self.qualname}, {len(self.args)} args, {state})"


class BaseConfig:
    """Attribute holder standing in for pytorch_GAN_zoo's `models.utils.config.BaseConfig`."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, BaseConfig) else v) for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"BaseConfig({vars(self)!r})"


# torch.load matches allow-listed classes by `__module__.__qualname__`: this one must
# carry the name the zoo pickled, while living (and being harmless) here.
BaseConfig.__module__ = "models.utils.config"

# Classes that public formats legitimately pickle inside torch.save files.
DEFAULT_TORCH_CLASSES: tuple[type, ...] = (BaseConfig, argparse.Namespace)

LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-1.6 (non-zip) torch.save file


def describe_source(source: Any) -> str:
    """The name an error message gives a path or open file."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", "<stream>"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _refusal_reason(error: BaseException) -> str:
    """The informative line of torch's multi-paragraph weights_only refusal."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please ", "In PyTorch 2.6")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return (reasons or lines or [type(error).__name__])[0]


def _checkpoint_error(source: Any, what: str, error: BaseException | None = None) -> CheckpointError:
    reason = f" ({_first_line(error)})" if error is not None else ""
    return CheckpointError(f"{describe_source(source)}: {what}{reason}")


# ---------------------------------------------------------------------------
# allow-listed callables: each one builds plain data and cannot reach code
# ---------------------------------------------------------------------------

def _load_storage_from_bytes(data: bytes) -> Any:
    """NVlabs pickles keep tensor storages as `torch.save` bytes: read them with weights_only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch.storage._load_from_bytes expects bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation, not the user's concern
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise pickle.UnpicklingError(f"embedded tensor bytes held {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    # Hooks and python-side metadata are dropped: they could only hold stand-ins.
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad),
                                               collections.OrderedDict())


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any = None,
                       state: Any = None) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as `_codecs.encode(str, "latin1")`.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _FrozenCall:
    """Wraps an allow-listed Python function: a pickle's BUILD could otherwise set attributes
    (even `__defaults__`) on the function object itself."""

    __slots__ = ("_func",)

    def __init__(self, func: Any) -> None:
        object.__setattr__(self, "_func", func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not modify the loader's functions")

    def __repr__(self) -> str:
        return f"allowed({self._func.__name__})"


class _FrozenType(type):
    """Metaclass of stand-ins: their attributes cannot be set from pickled state either."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not modify a stand-in class")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    allowed.update({
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _FrozenCall(_encode_latin1),
        ("torch._utils", "_rebuild_tensor_v2"): _FrozenCall(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _FrozenCall(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _FrozenCall(_rebuild_parameter),
        ("torch.storage", "_load_from_bytes"): _FrozenCall(_load_storage_from_bytes),
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    })
    for dtype_name in ("float16", "float32", "float64", "bfloat16", "uint8", "int8", "int16",
                       "int32", "int64", "bool", "complex64", "complex128"):
        allowed[("torch", dtype_name)] = getattr(torch, dtype_name)
    return allowed


_ALLOWED = _allowed_globals()


def _make_stand_in(module: str, name: str) -> type:
    """A class whose construction (REDUCE, NEWOBJ, INST) yields a `PickledRecord` for `module.name`.

    Pickle's NEWOBJ insists on a class, so the stand-in is one; its `__new__` returns a
    record, which is not an instance of it, so no `__init__` runs either.
    """

    def __new__(cls: type, *args: Any, **kwargs: Any) -> PickledRecord:
        return PickledRecord(module, name, args, kwargs)

    return _FrozenType(f"StandIn[{module}.{name}]", (), {"__new__": __new__, "__module__": __name__})


# Protocol 0-2 pickles name builtins by their Python 2 modules.
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RecordingUnpickler(pickle.Unpickler):
    """Resolves allow-listed globals to themselves and every other global to an inert stand-in."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PYTHON2_MODULES.get(module, module)
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key == ("copyreg", "_reconstructor"):
            return _FrozenCall(self._reconstruct_object)
        if key not in self._stand_ins:
            self._stand_ins[key] = _make_stand_in(module, name)
        return self._stand_ins[key]

    def _reconstruct_object(self, cls: Any, base: Any, state: Any = None) -> PickledRecord:
        # Protocol 0/1 objects arrive as `copyreg._reconstructor(cls, object, None)`.
        if isinstance(cls, type) and cls in self._stand_ins.values():
            return cls()
        raise pickle.UnpicklingError(f"copyreg._reconstructor refused for {cls!r}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported in plain pickles")


def load_pickle(file_or_path: str | os.PathLike | BinaryIO) -> Any:
    """Unpickle a foreign file: allow-listed data types come back as themselves, everything else
    as `PickledRecord`s; tensors embedded NVlabs-style are read with `weights_only`.

    A pickle written by the legacy (non-zip) `torch.save` is handed to `load_torch`.
    Any failure raises `CheckpointError` with one line naming the file.
    """
    source = file_or_path
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(source, (str, os.PathLike)):
                handle = stack.enter_context(open(source, "rb"))
            else:
                handle = source
            result = _RecordingUnpickler(handle).load()
    except FileNotFoundError as error:
        raise _checkpoint_error(source, "no such file", None) from error
    except CheckpointError:
        raise
    except Exception as error:  # any decoding failure is the file's fault, not a bug here
        raise _checkpoint_error(source, "not a readable pickle", error) from error
    if isinstance(result, int) and result == LEGACY_TORCH_MAGIC and isinstance(source, (str, os.PathLike)):
        return load_torch(source)
    return result


def load_torch(path: str | os.PathLike | BinaryIO, extra_classes: Iterable[type | tuple[Any, str]] = ()) -> Any:
    """`torch.load(weights_only=True, map_location="cpu")` with the harmless classes public
    formats pickle inside (zoo `BaseConfig` stand-in, `argparse.Namespace`) plus `extra_classes`.

    Refusals and read failures raise `CheckpointError` with one line naming the file.
    """
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise _checkpoint_error(path, "no such file")
    allowed = [*DEFAULT_TORCH_CLASSES, *extra_classes]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        raise _checkpoint_error(path, f"refused by the safe (weights_only) loader ({reason})") from error
    except Exception as error:  # truncated zip, corrupt records, not a torch file
        raise _checkpoint_error(path, "not a readable torch checkpoint", error) from error


def is_zip_file(path: str | os.PathLike) -> bool:
    """torch.save files since PyTorch 1.6 are zip archives."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError as error:
        raise _checkpoint_error(path, "cannot be opened", error) from error



def variable_arrays(values: Any, role: str) -> dict[str, np.ndarray]:
    """A name -> tensor (or array) mapping read from a file as name -> ndarray; a CheckpointError naming
    the network `role` when it is not one (the TF-variables files patchscope writes)."""
    if not isinstance(values, dict):
        raise CheckpointError(f"network {role}: expected a mapping of variables")
    try:
        return {str(k): np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"network {role} has unreadable variables ({error})") from error
