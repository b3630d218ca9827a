"""Cached pipeline stages for `patchscope demo`: each stage runs once per settings, a re-run resumes.

A stage is identified by a key hashed from its settings and the run ids of the stages it reads (a fresh id
each time a stage starts afresh), so changing one setting redoes that stage and everything downstream of
it, and nothing else — and a downstream result is never paired with another run of its inputs.
`stages.json` in the output folder records every key, run id, whether the stage finished, and its summary.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click

from patchscope.common.atomic import write_json

BOOK_FILE = "stages.json"


def stage_key(settings: Mapping[str, Any], upstream_keys: Sequence[str]) -> str:
    text = json.dumps({"settings": settings, "upstream": list(upstream_keys)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageBook:
    """The record of a demo folder's stages; `run` skips, resumes or (re)starts one stage."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / BOOK_FILE
        try:
            self.records: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.records = {}  # an unreadable book only costs recomputation
        if not isinstance(self.records, dict):
            self.records = {}

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.records)

    def run_id(self, name: str) -> str:
        """The id of the run of `name` whose results are in its folder (new whenever it starts afresh)."""
        return self.records[name]["run"]

    def run(self, name: str, folder: Path, settings: Mapping[str, Any], upstream: Sequence[str],
            work: Callable[[bool], dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        """Run `work(resume)` unless the stage already finished with these settings and inputs.

        Same key, unfinished: `work(True)` continues what the last run left in `folder`. Another key
        (or none): `folder` is emptied first and `work(False)` starts afresh. Returns the summary.
        """
        key = stage_key(settings, [self.run_id(u) for u in upstream])
        record = self.records.get(name, {})
        started = time.perf_counter()
        if record.get("key") == key and record.get("done") and "run" in record:
            summary = record["summary"]
            click.echo(f"[{name:>10}] {describe(summary)} (cached)")
            return summary
        resume = record.get("key") == key and folder.exists() and "run" in record
        if not resume and folder.exists():
            shutil.rmtree(folder)
        run = record["run"] if resume else uuid.uuid4().hex
        self.records[name] = {"key": key, "run": run, "done": False}
        self._save()
        summary = work(resume)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        self.records[name] = {"key": key, "run": run, "done": True, "summary": summary}
        self._save()
        click.echo(f"[{name:>10}] {describe(summary)} ({summary['seconds']:.1f} s)")
        return summary
