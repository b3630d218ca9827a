"""Reading files a user or a foreign run folder names: regular files only, with a size bound, JSON depth-checked.

Used by the readers of settings (YAML), classifier metadata, generator checkpoints and Glow hparams.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO

from patchscope.common.errors import InputError

__all__ = ["check_regular", "open_regular", "read_regular", "NotRegularFile", "file_kind", "read_json", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

MAX_JSON_BYTES = 16 << 20  # metadata and hparams files are a few kB; this is only a guard
MAX_JSON_DEPTH = 64        # deeper documents are refused before code that recurses meets them

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What a file that is not regular is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def check_regular(path: str | os.PathLike, what: str, error: type[InputError] = InputError) -> int:
    """The size of `path` (symlinks followed), which must be a regular file: reading a FIFO or a
    device would block or never end. Anything else raises one line of `error`."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file; expected {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err}); expected {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: {file_kind(info.st_mode)}, not a regular file; expected {what}")
    return info.st_size


class NotRegularFile(OSError):
    """`open_regular` met a folder, FIFO, socket or device; `kind` says which ("a FIFO (named pipe)")."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"{path}: {kind}, not a regular file")
        self.kind = kind


def open_regular(path: str | os.PathLike) -> tuple[BinaryIO, os.stat_result]:
    """The file opened for reading, and its fstat, refused (NotRegularFile) unless it is a regular file.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer forever; the fstat of the
    opened descriptor then refuses FIFOs, devices and folders before a byte is read, with no window in which
    the path could be swapped. Reads of regular files ignore O_NONBLOCK. OSError of the open passes through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, file_kind(info.st_mode))
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, what: str, limit: int, error: type[InputError] = InputError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; one line of `error` otherwise."""
    check_regular(path, what, error)
    try:  # a FIFO put in its place after the check neither blocks the open nor passes its fstat
        handle, info = open_regular(path)
    except NotRegularFile as err:
        raise error(f"{path}: {err.kind}, not a regular file; expected {what}") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err}); expected {what}") from None
    with handle:
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size} bytes, more than the {limit} expected of {what}")
        # read(limit + 1) would allocate a buffer of the limit (gigabytes) whatever the file's size:
        # take what fstat saw, then whatever a file still growing added, up to one byte past the limit.
        data = handle.read(info.st_size + 1)
        while len(data) <= limit and (more := handle.read(min(limit + 1 - len(data), 1 << 24))):
            data += more
    if len(data) > limit:
        raise error(f"{path}: more than the {limit} bytes expected of {what}")
    return data


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (lists and dicts), walked without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: str | os.PathLike, what: str, error: type[InputError] = InputError,
              limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of a regular file; too large, too deep, not UTF-8 or not JSON is one line of `error`."""
    data = read_regular(path, what, limit, error)
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply; expected {what}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({str(err).splitlines()[0][:80]}); expected {what}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise error(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; expected {what}")
    return value

