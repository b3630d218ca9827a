"""Reading foreign checkpoints without running them: an allow-list unpickler and a guarded torch.load.

Used by `generators.io.formats` and every format loader (PGAN, StyleGAN, StyleGAN2, Glow).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import pickle
import reprlib
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch

from patchscope.common.errors import CheckpointError
from patchscope.common.userfiles import check_regular
from patchscope.generators.io import archive, bounds
from patchscope.generators.io.allowlist import FrozenCall, allowed_globals, has_object, torch_reason

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
        """Nested configs as dicts, each converted once (shared ones stay shared, not expanded); a config
        that contains itself or nests deeper than 32 raises ValueError. Immune to state named `to_dict`."""
        return _config_dict(self, {}, ())

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        return f"BaseConfig({vars(self)!r})"


def _config_dict(config: BaseConfig, done: dict[int, dict[str, Any]], path: tuple[int, ...]) -> dict[str, Any]:
    if id(config) in path:
        raise ValueError("the config contains itself")
    if len(path) > 32:
        raise ValueError("the config nests more than 32 levels deep")
    if id(config) not in done:
        inner = (*path, id(config))
        done[id(config)] = {k: (_config_dict(v, done, inner) if isinstance(v, BaseConfig) else v)
                            for k, v in vars(config).items()}
    return done[id(config)]


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
    return f"{type(error).__name__}: {torch_reason(error)}"


def _checkpoint_error(source: Any, what: str, error: BaseException | None = None) -> CheckpointError:
    reason = f" ({_first_line(error)})" if error is not None else ""
    return CheckpointError(f"{describe_source(source)}: {what}{reason}")


class _FrozenType(type):
    """Metaclass of stand-ins: their attributes cannot be set from pickled state either."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not modify a stand-in class")


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


def _load_build(self: _RecordingUnpickler) -> None:
    # numpy's ndarray and dtype take their content by BUILD (`__setstate__`): checked here, before numpy
    # copies the data (it does for text or byte-swapped data, once per BUILD of a memoised state).
    state, target = self.stack[-1], self.stack[-2]
    if isinstance(target, np.ndarray):
        parts = state if isinstance(state, tuple) else ()
        dtype = next((p for p in parts if isinstance(p, np.dtype)), None)
        shape = next((p for p in parts if isinstance(p, tuple)), ())
        if dtype is None or has_object(dtype):
            raise pickle.UnpicklingError("numpy arrays of object dtype (or without a dtype) are refused")
        count = math.prod(n for n in shape if isinstance(n, int))
        self.budget.charge(max(bounds.sized(parts[-1]) if parts else 0, count), "an array")
    archive.BOUNDED_DISPATCH[pickle.BUILD[0]](self)
    if isinstance(target, np.dtype) and has_object(target):
        raise pickle.UnpicklingError("numpy dtypes holding objects (object dtype) are refused")


class _RecordingUnpickler(pickle._Unpickler):
    """Resolves allow-listed globals to themselves and every other global to an inert stand-in.

    The pure-Python unpickler, so that BUILD and the reads can be checked (its speed equals the C one's
    on checkpoints: their time goes into a few large byte strings)."""

    dispatch = {**archive.BOUNDED_DISPATCH, pickle.BUILD[0]: _load_build}

    def __init__(self, reader: archive.BoundedReader, budget: bounds.Budget) -> None:
        super().__init__(reader)
        self.reader, self.budget = reader, budget
        self._allowed = allowed_globals(budget)
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PYTHON2_MODULES.get(module, module)
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if key == ("copyreg", "_reconstructor"):
            return FrozenCall(self._reconstruct_object)
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

    What it may allocate is bounded by the file's size (`bounds.Budget`); a pickle written by the
    legacy (non-zip) `torch.save` is handed to `load_torch`. Any failure raises `CheckpointError`
    with one line naming the file.
    """
    source = file_or_path
    name = describe_source(source)
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(source, (str, os.PathLike)):
                check_regular(source, "a checkpoint", CheckpointError)
                handle = stack.enter_context(open(source, "rb"))
            else:
                handle = source if source.seekable() else io.BytesIO(source.read())
            size = archive.stream_size(handle)
            result = _RecordingUnpickler(archive.BoundedReader(handle, size), bounds.Budget.for_file(size, name)).load()
            refuse_shadowed_methods(result, name)
    except FileNotFoundError as error:
        raise _checkpoint_error(source, "no such file", None) from error
    except CheckpointError as error:  # raised by a check inside the unpickler, which may not know the file
        raise error if name in str(error) else CheckpointError(f"{name}: {error}") from None
    except Exception as error:  # any decoding failure is the file's fault, not a bug here
        raise _checkpoint_error(source, "not a readable pickle", error) from None
    if isinstance(result, int) and result == LEGACY_TORCH_MAGIC and isinstance(source, (str, os.PathLike)):
        return load_torch(source)
    return result


def load_torch(path: str | os.PathLike | BinaryIO, extra_classes: Iterable[type | tuple[Any, str]] = ()) -> Any:
    """`torch.load(weights_only=True, map_location="cpu")` with the harmless classes public
    formats pickle inside (zoo `BaseConfig` stand-in, `argparse.Namespace`) plus `extra_classes`.

    Declared sizes are checked first (`archive.check_torch_stream`) and tensors after (`bounds.check_tensors`),
    so memory stays bounded by the file. Refusals and read failures raise `CheckpointError` with one line.
    """
    name = describe_source(path)
    allowed = [*DEFAULT_TORCH_CLASSES, *extra_classes]
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(path, (str, os.PathLike)):
                if not Path(path).exists():
                    raise _checkpoint_error(path, "no such file")
                check_regular(path, "a torch checkpoint", CheckpointError)
                handle = stack.enter_context(open(path, "rb"))
            else:
                handle = path
            archive.check_torch_stream(handle, name)
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result = torch.load(handle, weights_only=True, map_location="cpu")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise _checkpoint_error(path, f"refused by the safe loader ({torch_reason(error)})") from None
    except Exception as error:  # truncated zip, corrupt records, not a torch file
        raise _checkpoint_error(path, "not a readable torch checkpoint", error) from None
    bounds.check_tensors(result, name)
    refuse_shadowed_methods(result, name)
    return result


def refuse_shadowed_methods(obj: Any, source: str) -> None:
    """Refuse a dict whose pickled state set attributes named like its methods: BUILD may update an
    OrderedDict's `__dict__` (torch's loader allows it, for `_metadata`), and code calling its `.get`
    or `.items` would then call what the file put there. Each object is visited once."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, bytearray, int, float, np.ndarray, torch.Tensor)):
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            shadowed = [k for k in getattr(value, "__dict__", {}) if isinstance(k, str) and hasattr(type(value), k)]
            if shadowed:
                raise CheckpointError(f"{source}: an {type(value).__name__} whose pickled state replaces its method "
                                      f"{shadowed[0]!r}; refused before any of its methods is called")
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif isinstance(value, PickledRecord):
            stack.extend((value.args, value.kwargs, value.state, value.items, value.dict_items))
        elif isinstance(getattr(value, "__dict__", None), dict):
            stack.extend(vars(value).values())


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
