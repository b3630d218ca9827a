"""The run-folder rule: --out holds one run; a run's folder is refused unless --resume (same settings) or --force.

Used by train, train-gan, invert, finetune, exaggerate, retrain and the demo, each holding the folder's lock while
it works there; sampling and prepare use its leftovers test."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

from patchscope.common import config as configs
from patchscope.common.atomic import is_temporary_name, write_text
from patchscope.common.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are then not locked (see `hold`)
    fcntl = None

log = logging.getLogger("patchscope.runfolder")

RECORD = "config.yaml"  # the run's settings, beside its results; its presence marks a run folder
NO_FORCE = "this command has no --force"
LOCK_FILE = ".patchscope.lock"  # flock'ed by the process working in the folder; holds its pid


def plain(settings: Any) -> dict[str, Any]:
    """Settings (a dataclass or a mapping) as the record reads back: tuples as lists, keys as strings."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)
    return json.loads(json.dumps(dict(settings), default=str))


def leftovers(folder: str | Path) -> list[Path]:
    """Temporary files that crashed atomic writes left at the top of `folder` (`.NAME.XXXX.tmp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_temporary_name(p.name) and p.is_file())


def other_entries(folder: str | Path) -> list[Path]:
    """What `folder` holds besides such leftovers: a crash mid-write must not make a folder someone else's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if not (is_temporary_name(p.name) and p.is_file()) and p.name != LOCK_FILE)


def remove_leftovers(folder: str | Path) -> int:
    """Delete the leftovers of crashed atomic writes at the top of `folder`; returns how many."""
    found = leftovers(folder)
    for path in found:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return len(found)


# The folders this process holds: real path -> [descriptor of the flock'ed lock file (None: held unlocked, where no
# lock can be taken), number of holds]. A flock belongs to an open file: opening the lock file again in this process
# would find it locked by itself.
_HELD: dict[str, list[Any]] = {}


def hold(folder: str | Path) -> Path:
    """Lock `folder` (created if missing) for this process, or refuse it in one line while another process holds it.

    Holds nest: each wants one `release`, and the process's exit releases them all, however it ends. Where no lock
    can be taken (no fcntl, a file system without flock) the folder is used unlocked, as before locks existed.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, not a folder; choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _HELD:
        if holds(folder):
            _HELD[key][1] += 1
            return folder
        os.close(_HELD.pop(key)[0])  # the folder was emptied or replaced since: lock its new lock file
    _HELD[key] = [_lock(folder), 1]
    return folder


def holds(folder: str | Path) -> bool:
    """Whether this process holds `folder` (see `hold`)."""
    held = _HELD.get(os.path.realpath(folder))
    return held is not None and (held[0] is None or _opens(held[0], Path(folder) / LOCK_FILE))


def release(folder: str | Path) -> None:
    """Undo one `hold` of `folder` by this process; the last one unlocks it (the lock file stays, empty of meaning)."""
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] -= 1
        if _HELD[key][1] <= 0:
            fd = _HELD.pop(key)[0]
            if fd is not None:
                os.close(fd)


def clear(folder: str | Path) -> None:
    """Delete everything in `folder` except its lock file: starting over in a folder this process holds."""
    for path in Path(folder).iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _lock(folder: Path) -> int | None:
    """Take the lock of `folder`; returns its descriptor, None where locks cannot be taken."""
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{folder}: in use by another patchscope process (pid {owner}); "
                         f"wait for it or choose another --out") from None
    except OSError as err:
        os.close(fd)
        log.warning("%s: cannot lock this folder (%s); make sure no other run uses it meanwhile", folder, err.strerror)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _opens(fd: int, path: Path) -> bool:
    """Whether the descriptor `fd` is open on the file now at `path`."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _same(old: Any, new: Any) -> bool:
    # NaN never equals itself, yet a NaN setting read back from its record is the same setting.
    both_nan = isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new)
    return both_nan or old == new


def changed_settings(saved: Mapping[str, Any], current: Any, resumable: Collection[str] = (),
                     nested: Mapping[str, type] | None = None) -> list[str]:
    """Names of the settings in `current` whose value differs from `saved`, those in `resumable` aside.

    A mapping on both sides is compared key by key under dotted names ("train.lr"), which `resumable` may
    use. A top-level setting only the record has is not compared: a newer version may have dropped it; nor
    is one only `current` has at its default (a dataclass field a newer version added, as the run had it); `nested`
    names the dataclass of a mapping setting ({"train": TrainConfig}) so the same holds inside it.
    """
    defaults = {"": _field_defaults(current), **{name + ".": _field_defaults(kind) for name, kind in (nested or {}).items()}}

    def walk(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str, keys: list[str]) -> list[str]:
        changed = []
        for key in keys:
            name, before, after = prefix + key, old.get(key), new.get(key)
            if name in resumable:
                continue
            added = defaults.get(prefix, {})
            if key not in old and key in added and _same(added[key], after):
                continue
            if isinstance(before, Mapping) and isinstance(after, Mapping):
                changed += walk(before, after, name + ".", [*after, *(k for k in before if k not in after)])
            elif not _same(before, after):
                changed.append(name)
        return changed

    new = plain(current)
    return walk(plain(saved), new, "", list(new))


def _field_defaults(settings: Any) -> dict[str, Any]:
    """Plain default values of a dataclass's fields (those with a default)."""
    if not dataclasses.is_dataclass(settings):  # an instance or the class itself
        return {}
    defaults = {}
    for f in dataclasses.fields(settings):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        defaults[f.name] = json.loads(json.dumps(value, default=str))
    return defaults


def saved_values(saved: Mapping[str, Any], names: Collection[str]) -> str:
    """`name=value` of each (dotted) name in the record, for a message."""
    def lookup(name: str) -> Any:
        value: Any = saved
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value

    return ", ".join(f"{name}={lookup(name)!r}" for name in names)


def refuse_changes(where: str | Path, saved: Mapping[str, Any], current: Any, resumable: Collection[str] = (),
                   hint: str = "", nested: Mapping[str, type] | None = None) -> None:
    """Raise an InputError naming every setting (and its saved value) a resume may not change but would."""
    changed = changed_settings(saved, current, resumable, nested)
    if changed:
        raise InputError(f"{where}: cannot resume with different {', '.join(changed)} "
                         f"(saved: {saved_values(saved, changed)}){hint}")


@dataclass(frozen=True)
class RunFolder:
    """How one command guards its output folder, whose `config.yaml` records the run's settings.

    `check` accepts a new or empty folder; refuses one holding files a run never writes (not in `writes`);
    refuses a run of this command unless --resume with the same settings (`resumable` aside) or --force,
    and one cut short before its record unless --force. Leftovers of crashed atomic writes never count,
    and are removed once the folder is accepted. An accepted folder is held (`hold`) by this process until
    its exit or `release`, so a second process is refused while the first works there; the lock file
    never counts either. `save` writes the record, holding first a folder that did not exist at `check`
    (so a command refused for other reasons after `check` leaves no folder behind).
    """

    holds: str                            # what such a folder holds, in messages: "a run", "an exaggeration"
    resumable: Collection[str] = ()       # settings a resume may change; "train.workers" names a nested one
    resume_to: str = "continue it"        # what --resume does, in messages
    force_to: str | None = "start again"  # what --force does, in messages; None: the command has no --force
    kind: str | None = None               # the `kind` its settings record, when they name their command
    writes: Collection[str] = ()          # names a run writes at the top of its folder, besides config.yaml
    nested: Mapping[str, type] | None = None  # the dataclass of a mapping setting ({"train": TrainConfig})

    def check(self, out: str | Path, settings: Any, *, resume: bool, force: bool = False) -> Path:
        """Refuse `out` unless this run may write there (see the class), then hold it if it exists; returns it."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: is a file, not a folder; choose another --out")
        if not out.exists():
            return out  # nothing to refuse; `save` holds the folder when it creates it
        if not (out / LOCK_FILE).exists():
            self._inspect(out, settings, resume, force)  # refuse someone else's folder before writing a lock into it
        hold(out)
        try:
            self._inspect(out, settings, resume, force)  # again, now that no other process can change it
        except BaseException:
            release(out)
            raise
        remove_leftovers(out)
        return out

    def _inspect(self, out: Path, settings: Any, resume: bool, force: bool) -> None:
        record = out / RECORD
        if not record.is_file():
            others = other_entries(out)
            strays = [path for path in others if path.name not in self.writes]
            # Files this command never writes are someone else's, whatever the flags; a folder of its own
            # results without a record is a run killed before writing it, which --force may start over.
            if strays or (others and not self.force_to):
                raise InputError(f"{out}: is not {self.holds} folder (it holds {_named(strays or others)} and no "
                                 f"{RECORD}); choose another --out" + ("" if self.force_to else f" ({NO_FORCE})"))
            if others and not force:
                raise InputError(f"{out}: holds {self.holds} cut short before its {RECORD} ({_named(others)}); "
                                 f"pass --force to {self.force_to} or choose another --out")
        elif not force or self.kind:
            saved = self._read(record, force)
            if saved is not None and self.kind and saved.get("kind") != self.kind:
                raise InputError(f"{record}: records a {saved.get('kind')!r} run, not {self.holds}; "
                                 f"choose another --out")
            if not force:
                if not resume:
                    raise InputError(f"{out}: already holds {self.holds}; pass --resume to {self.resume_to}, "
                                     + (f"--force to {self.force_to}, or choose another --out" if self.force_to
                                        else f"or choose another --out ({NO_FORCE}: remove the folder to start "
                                             f"again)"))
                refuse_changes(out, saved, settings, self.resumable, hint=self._restart_hint(), nested=self.nested)

    def save(self, out: str | Path, settings: Any) -> Path:
        """Create `out` and write its `config.yaml` (atomically) from the settings; returns the record's path."""
        out = Path(out)
        if not holds(out):  # new when checked: hold it now that it exists, unless another run took it meanwhile
            hold(out)
            if (out / RECORD).exists():
                release(out)
                raise InputError(f"{out}: was claimed by another patchscope process meanwhile; choose another --out")
        write_text(out / RECORD, configs.to_yaml(plain(settings)))
        return out / RECORD

    def claim(self, out: str | Path, settings: Any, *, resume: bool, force: bool = False) -> Path:
        """`check`, then `save`: for commands that keep their settings record from the start; returns `out`."""
        out = self.check(out, settings, resume=resume, force=force)
        self.save(out, settings)
        return out

    def _read(self, record: Path, force: bool) -> dict[str, Any] | None:
        """The saved settings; None for an unreadable record under --force, which starts over regardless."""
        try:
            return configs.read_yaml(record)
        except InputError as err:
            if force:
                return None
            raise InputError(f"{err}{self._restart_hint()}") from None

    def _restart_hint(self) -> str:
        if self.force_to:
            return f"; pass --force to {self.force_to} or choose another --out"
        return f"; choose another --out ({NO_FORCE}: remove the folder to start again)"


def _named(paths: list[Path]) -> str:
    return paths[0].name + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
