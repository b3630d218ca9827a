"""The allow-list of the checkpoint unpickler: the few callables a pickle may name, each building plain data
and charging what it allocates to the load's budget; and what torch's refusals found, without their advice.

Used by `generators.io.safe_pickle`.
"""
from __future__ import annotations

import collections
import functools
import io
import math
import pickle
import re
import warnings
from typing import Any

import numpy as np
import torch

from patchscope.generators.io import archive, bounds

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's refusals advise re-running with weights_only=False or allow-listing the global: exactly what a
# user must not do with a stranger's file, so none of that text is ever passed on.
_ADVICE = re.compile(r"weights_only|trust|safe_globals|add_safe_globals|allowlist|Weights only load failed"
                     r"|Check the documentation|https?://", re.IGNORECASE)


def _first_sentence(text: str, limit: int = 120) -> str:
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", _ANSI.sub("", text).strip())  # c10's location prefix
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torch_reason(error: BaseException) -> str:
    """What torch's loader found wrong, in a few words, without its advice: the global a refused file
    names, else the first line of the error that gives no advice."""
    text = _ANSI.sub("", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it names {found[1]}, which is not on the allow-list of data types"
    for marker in ("WeightsUnpickler error:", "Unpickler error:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _ADVICE.search(line)]
    return _first_sentence(lines[0]) if lines else type(error).__name__


# ---------------------------------------------------------------------------
# allow-listed callables: each one builds plain data and cannot reach code; those that allocate in
# proportion to an argument charge the load's Budget first
# ---------------------------------------------------------------------------

def has_object(dtype: Any) -> bool:
    """Whether a dtype holds Python objects anywhere (fields, sub-arrays): such arrays rebuilt from raw
    bytes would hold forged pointers, so they are refused before they exist."""
    stack, seen = [dtype], 0
    while stack:
        current, seen = stack.pop(), seen + 1
        if not isinstance(current, np.dtype) or current.hasobject or current.kind == "O" or seen > 10_000:
            return True
        stack.extend(field[0] for field in (current.fields or {}).values())
        if current.subdtype is not None:
            stack.append(current.subdtype[0])
    return False


def _load_storage_from_bytes(data: bytes, budget: bounds.Budget) -> Any:
    """NVlabs pickles keep tensor storages as `torch.save` bytes: their declared sizes are checked against
    the bytes, then they are read with weights_only."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch.storage._load_from_bytes expects bytes")
    stream = io.BytesIO(bytes(data))
    budget.charge(max(archive.check_torch_stream(stream, budget.source), len(data)), "an embedded tensor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation, not the user's concern
            storage = torch.load(stream, weights_only=True, map_location="cpu")
    except Exception as error:  # torch's refusal text carries advice: pass on what it found only
        raise pickle.UnpicklingError(f"embedded tensor bytes refused: {torch_reason(error)}") from None
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
        tensor = torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad),
                                                 collections.OrderedDict())
    bounds.check_tensor(tensor, "a pickled tensor")
    return tensor


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any = None,
                       state: Any = None) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _encode_latin1(text: str, encoding: str = "latin1", *, budget: bounds.Budget) -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as `_codecs.encode(str, "latin1")`.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    budget.charge(len(text), "bytes")
    return text.encode("latin1")


def _bytearray(*args: Any, budget: bounds.Budget) -> bytearray:
    # Pickled bytearrays arrive as bytearray(bytes) or bytearray(str, "latin-1"); bytearray(2**31) is
    # 40 bytes of pickle asking for 2 GiB.
    first = args[0] if args else b""
    if isinstance(first, int):
        size = first
    elif isinstance(first, str):
        size = len(first)
    else:
        try:
            size = memoryview(first).nbytes
        except TypeError:
            size = bounds.sized(first)
    budget.charge(size, "a bytearray")
    return bytearray(*args)


def _copying(func: Any, budget: bounds.Budget, what: str) -> Any:
    """`func(iterable)` charged for the items it copies (a memoised list can be passed a million times)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        budget.charge(bounds.sized(args[0]) if args else 0, what)
        return func(*args, **kwargs)

    call.__name__ = getattr(func, "__name__", what)
    return call


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _ndarray_called(*args: Any, **kwargs: Any) -> None:
    raise pickle.UnpicklingError("numpy.ndarray may only be named as _reconstruct's type, not called "
                                 "(ndarray(shape) allocates whatever shape a pickle asks for)")


def _reconstruct(subtype: Any, shape: Any, dtype: Any, *, budget: bounds.Budget) -> np.ndarray:
    # numpy pickles call _reconstruct(ndarray, (0,), b"b") and fill the array by BUILD; a larger shape
    # here is an allocation the file never pays for.
    if subtype is not NDARRAY or not isinstance(shape, tuple) or not all(isinstance(n, int) for n in shape):
        raise pickle.UnpicklingError("numpy _reconstruct only rebuilds plain ndarrays")
    budget.charge(math.prod(shape) * np.dtype(dtype).itemsize, "an array")
    return _numpy_multiarray()._reconstruct(np.ndarray, shape, dtype)


def _scalar(dtype: Any, data: Any = None) -> Any:
    if has_object(dtype):
        raise pickle.UnpicklingError("numpy scalars of object dtype are refused")
    return _numpy_multiarray().scalar(dtype, data) if data is not None else _numpy_multiarray().scalar(dtype)


class FrozenCall:
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
        return f"allowed({getattr(self._func, '__name__', self._func)})"


NDARRAY = FrozenCall(_ndarray_called)  # what a pickle's `numpy.ndarray` resolves to


def allowed_globals(budget: bounds.Budget) -> dict[tuple[str, str], Any]:
    """The allow-list of one load: plain types as themselves, allocating constructors charged to `budget`."""
    frozen = lambda func, **bound: FrozenCall(functools.partial(func, **bound) if bound else func)  # noqa: E731
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = frozen(_reconstruct, budget=budget)
        allowed[(module, "scalar")] = frozen(_scalar)
    allowed.update({
        ("numpy", "ndarray"): NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): frozen(_copying(collections.OrderedDict, budget, "a mapping")),
        ("builtins", "set"): frozen(_copying(set, budget, "a set")),
        ("builtins", "frozenset"): frozen(_copying(frozenset, budget, "a set")),
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): frozen(_bytearray, budget=budget),
        ("_codecs", "encode"): frozen(_encode_latin1, budget=budget),
        ("torch._utils", "_rebuild_tensor_v2"): frozen(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): frozen(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): frozen(_rebuild_parameter),
        ("torch.storage", "_load_from_bytes"): frozen(_load_storage_from_bytes, budget=budget),
        ("torch", "Size"): frozen(_copying(torch.Size, budget, "a shape")),
        ("torch", "device"): torch.device,
    })
    for dtype_name in ("float16", "float32", "float64", "bfloat16", "uint8", "int8", "int16",
                       "int32", "int64", "bool", "complex64", "complex128"):
        allowed[("torch", dtype_name)] = getattr(torch, dtype_name)
    return allowed
