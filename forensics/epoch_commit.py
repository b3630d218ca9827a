"""An epoch's files as one commit: staged in `.staged/`, committed by renaming `checkpoint.json` into place, then published.

`fit` saves every epoch with `commit` and starts with `recover`, which leaves the run folder as the last commit says.
Finetuning (`attacks.finetune`) saves its checkpoints the same way, counted in steps (`counter="step"`): its log
lines are appended as they come, and a recovery drops those of steps after the last commit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

from patchscope.common.atomic import append_line, write_bytes, write_json, write_text
from patchscope.common.errors import InputError

log = logging.getLogger("patchscope.train")

MANIFEST = "checkpoint.json"  # the commit point: the epoch, its metrics line and the SHA-256 of every file it leaves
STAGING = ".staged"           # an epoch's files until they are committed and moved beside the manifest
LOG = "metrics.jsonl"         # one line per committed epoch (finetuning: its lines, up to the committed step)
KIND = "patchscope-epoch-commit"

# A file of a commit: its contents, or a function that writes it (atomically) at the path it is given, for writers
# that want a path (a generator checkpoint in its own format).
Contents = Union[bytes, Callable[[Path], Any]]


def commit(out: Path, epoch: int, files: Mapping[str, Contents], record: Mapping[str, Any] | None, *,
           counter: str = "epoch") -> None:
    """Save epoch `epoch`: `files` (name -> contents; files of earlier epochs it does not name stay) and its log line.

    Until the manifest's rename the folder holds the previous epoch, whatever else was written; from then on it holds
    this one, even when the moves and the log line that follow are cut short (`recover` finishes them). `counter`
    names what is counted ("epoch", "step") in the manifest and the log lines; with `record` None the caller writes
    the log itself, before the commit, and the commit only decides which of its lines stay.
    """
    staging = out / STAGING
    if staging.exists():
        remove_tree(staging)
    digests = {}
    for name, contents in files.items():
        if isinstance(contents, (bytes, bytearray)):
            write_bytes(staging / name, contents)
            digests[name] = _sha256(contents)
        else:
            write_file(staging / name, contents)
            digests[name] = _file_sha256(staging / name)
    _sync_folder(staging)
    previous = read_manifest(out, counter=counter)
    hashes = {**(previous["files"] if previous else {}), **digests}
    manifest = {"kind": KIND, counter: epoch, "files": hashes, "record": None if record is None else dict(record)}
    write_json(out / MANIFEST, manifest)
    _sync_folder(out)
    for name in files:
        move(staging / name, out / name)
    if record is not None:
        append_line(out / LOG, json.dumps(manifest["record"]))
    remove_tree(staging)


def recover(out: Path, *, counter: str = "epoch") -> dict[str, Any] | None:
    """Make `out` what its last commit says, and return that commit's manifest (None: no epoch was committed).

    Files of a committed epoch still staged are moved into place; whatever else is staged belongs to an epoch cut
    short before its commit, and is deleted; log lines of later epochs are dropped and a missing one is restored.
    A file that is neither what the commit says nor staged means the folder was changed by hand: refused.
    """
    manifest = read_manifest(out, counter=counter)
    staging = out / STAGING
    for name, digest in (manifest["files"] if manifest else {}).items():
        if _file_sha256(out / name) == digest:
            continue
        if _file_sha256(staging / name) != digest:
            raise InputError(f"{out / name}: not the file {MANIFEST} committed for {counter} {manifest[counter]} "
                             f"(changed or damaged since); the run cannot be continued: start a new one in another "
                             f"--out")
        move(staging / name, out / name)
    if staging.exists():
        if any(staging.iterdir()):
            done = manifest[counter] if manifest else 0
            if counter == "epoch":
                log.warning("%s: epoch %d was cut short while being saved; it is trained again", out, done + 1)
            else:
                log.warning("%s: a save after %s %d was cut short while being written; the run goes on from %s %d",
                            out, counter, done, counter, done)
        remove_tree(staging)
    settle_log(out / LOG, manifest, counter)
    return manifest


def adopt(out: Path, epoch: int, names: Iterable[str]) -> None:
    """Commit the files `names` already in `out` as epoch `epoch`, its log line from the log: for runs saved
    before epoch commits existed, once the caller has checked that the files agree on the epoch."""
    lines = [line for line in log_lines(out / LOG) if line.get("epoch") == epoch]
    hashes = {name: _file_sha256(out / name) for name in names if (out / name).is_file()}
    write_json(out / MANIFEST, {"kind": KIND, "epoch": epoch, "files": hashes, "record": lines[-1] if lines else None})


def read_manifest(out: Path, *, counter: str = "epoch") -> dict[str, Any] | None:
    """The last commit's manifest (None: nothing was committed), or an InputError for one that does not read."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("kind") == KIND and isinstance(manifest.get(counter), int)
            and isinstance(manifest.get("files"), dict)):
        raise InputError(f"{path}: unreadable record of the last saved {counter}; the run cannot be continued")
    return manifest


def settle_log(path: Path, manifest: Mapping[str, Any] | None, counter: str = "epoch") -> None:
    """Keep the log lines of committed epochs only, each once, the last commit's included."""
    epoch = manifest[counter] if manifest else 0
    kept = [line for line in log_lines(path) if line.get(counter, 0) <= epoch]
    if manifest and manifest.get("record") is not None and not any(line.get(counter) == epoch for line in kept):
        kept.append(manifest["record"])
    text = "".join(json.dumps(line) + "\n" for line in kept)
    if (path.read_text() if path.exists() else "") != text:
        write_text(path, text)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The log's records; a line that does not parse can only be one cut short by a crash, and is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Stage a file through its writer (`Contents`), which writes it atomically at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)


def move(source: Path, target: Path) -> None:
    os.replace(source, target)


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder)


def _sha256(contents: bytes) -> str:
    return hashlib.sha256(contents).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError):
        return None


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entries (the renames into it) to disk; a crash of the machine, not only of the process,
    must not lose a commit whose manifest survived. Not every platform can open a folder: skipped there."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
