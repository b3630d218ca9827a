"""Generalisation studies: every model trained on every training set, scored on every test set, one table.

`patchscope study` (cli/study.py) calls `load_study`, then `describe` (--dry-run) or `run_study`, which resumes.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from patchscope.analysis.evaluation import run_eval
from patchscope.analysis.tables import (FORMATS, RENDERERS, RESULTS_FILE, SUFFIXES, Result, Table,
                                        build_table, write_tables)
from patchscope.common import config as configs
from patchscope.common import runfolder
from patchscope.common.atomic import write_json
from patchscope.common.errors import InputError
from patchscope.common.runfolder import RunFolder, plain
from patchscope.common.userfiles import read_json
from patchscope.forensics import epoch_commit
from patchscope.forensics.evaluate import EvalConfig
from patchscope.forensics.train import RESUMABLE_CHANGES, TrainConfig, fit, stop_reason

log = logging.getLogger("patchscope.study")

GRID = ("models", "train_sets", "test_sets")  # the `study:` section's axes
SHARED = ("train", "eval", "table")           # shared settings: at the file's top level or inside `study:`
BY_STUDY = {"train": ("real", "fake", "out"), "eval": ("run", "tests", "out", "force")}  # set for each cell
TABLE_DEFAULTS = {"metric": "both", "digits": 1}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")  # row, training and test set names name folders
RECORD, KIND, RUNS, TABLE = "study.json", "patchscope-study", "runs", "table"  # OUT/study.json, OUT/runs/, OUT/table.*
FOLDER = RunFolder(holds="a study", resumable=("config", *GRID, *SHARED), force_to=None,
                   kind="study", writes=(RUNS, RECORD, *(TABLE + suffix for suffix in SUFFIXES.values())))


@dataclass
class Study:
    """A study config as `load_study` resolved it: data paths absolute, every section a plain mapping."""
    source: str                              # the YAML file
    models: dict[str, dict[str, Any]]        # row name -> train settings over `train` (model: defaults to the name)
    train_sets: dict[str, dict[str, str]]    # name -> {real, fake}
    test_sets: dict[str, dict[str, str]]     # name -> {real, fake[, split]}
    train: dict[str, Any]
    eval: dict[str, Any]
    table: dict[str, Any]

    def settings(self) -> dict[str, Any]:
        return {"kind": "study", "config": self.source, "models": self.models, "train_sets": self.train_sets,
                "test_sets": self.test_sets, "train": self.train, "eval": self.eval, "table": self.table}


@dataclass(frozen=True)
class Cell:
    """One model trained on one training set: its run folder and training settings."""
    model: str
    train_set: str
    run: Path
    train: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.model}__{self.train_set}"


# ----------------------------------------------------------------------------- the config

def _mapping(value: Any, where: str, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or (required and not value):
        raise InputError(f"{where}: expected a{' non-empty' if required else ''} mapping, got {value!r}")
    return value


def _known(mapping: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [str(key) for key in mapping if key not in known]
    if unknown:
        raise InputError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)}")


def _names(mapping: dict[str, Any], where: str) -> dict[str, Any]:
    for name in mapping:
        if not isinstance(name, str) or not NAME.match(name) or "__" in name:
            raise InputError(f"{where}: name {name!r} must be letters, digits, '_', '.', '+' or '-' (no '__'), "
                             "starting with a letter or digit: it names folders")
    return mapping


def _set(name: str, entry: Any, axis: str, where: str) -> dict[str, str]:
    """A training set {real, fake} or test set {real, fake[, split]}, paths made absolute (from the current folder)."""
    where = f"{where}.{axis}.{name}"
    entry = _mapping(entry, where, required=True)
    _known(entry, ("real", "fake", "split") if axis == "test_sets" else ("real", "fake"), where)
    for key in ("real", "fake", *entry):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip() or (axis == "test_sets" and "," in value):
            raise InputError(f"{where}.{key}={value!r}: expected a {'split name' if key == 'split' else 'path'}"
                             + (" without a comma (eval reads NAME=REAL,FAKE)" if axis == "test_sets" else ""))
    return {key: value if key == "split" else os.path.abspath(os.path.expanduser(value))
            for key, value in entry.items()}


def _settings(cls: type, layers: list[dict[str, Any]], where: str) -> Any:
    try:
        return configs.resolve(cls, *layers, source=where)
    except InputError as err:
        raise InputError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None


def load_study(path: str | os.PathLike) -> Study:
    """Read a study config and check all of it: keys, names, every cell's train and eval settings (model names
    against the registry); missing data paths are left to `missing_paths`, so a dry run can list them."""
    where = str(path)
    data = configs.read_yaml(path)
    _known(data, ("study", *SHARED), where)
    grid = _mapping(data.get("study"), f"{where}: study", required=True)
    _known(grid, (*GRID, *SHARED), f"{where}: study")
    shared = {}
    for key in SHARED:
        if key in data and key in grid:
            raise InputError(f"{where}: `{key}:` is given twice (at the top level and under study:); keep one")
        shared[key] = _mapping(grid.get(key, data.get(key)), f"{where}: {key}")
    axes = {axis: _names(_mapping(grid.get(axis), f"{where}: study.{axis}", True), f"{where}: study.{axis}")
            for axis in GRID}
    models = {name: dict(_mapping(entry, f"{where}: study.models.{name}")) for name, entry in axes["models"].items()}
    sections = [(f"{where}: train", shared["train"], "train"), (f"{where}: eval", shared["eval"], "eval")]
    for spot, entry, kind in sections + [(f"{where}: study.models.{n}", e, "train") for n, e in models.items()]:
        if taken := [key for key in entry if key in BY_STUDY[kind]]:
            raise InputError(f"{spot}: {', '.join(taken)}: set by the study for each cell (from train_sets, "
                             "test_sets and --out)")
    sets = {axis: {name: _set(name, entry, axis, f"{where}: study") for name, entry in axes[axis].items()}
            for axis in ("train_sets", "test_sets")}
    study = Study(where, models, sets["train_sets"], sets["test_sets"], dict(shared["train"]), dict(shared["eval"]),
                  {**TABLE_DEFAULTS, **shared["table"]})
    first = next(iter(study.train_sets))
    for model in study.models:  # every model's settings; the training sets only change the data paths
        _train_settings(study, model, first, Path("."))
    for test in study.test_sets:
        _eval_settings(study, test, Path("."))
    _known(study.table, tuple(TABLE_DEFAULTS), f"{where}: table")
    try:  # an empty table checks the settings the way the study's own will
        build_table([], study.table["metric"], study.eval.get("aggregation", EvalConfig.aggregation),
                    digits=study.table["digits"])
    except InputError as err:
        raise InputError(f"{where}: table: {err}") from None
    return study


def _train_settings(study: Study, model: str, train_set: str, run: Path) -> TrainConfig:
    layers = [study.train, {"model": model}, study.models[model], {**study.train_sets[train_set], "out": str(run)}]
    return _settings(TrainConfig, layers, f"{study.source}: study.models.{model}")


def _eval_settings(study: Study, test: str, run: Path) -> EvalConfig:
    spec = study.test_sets[test]
    layers = [study.eval, {"split": spec.get("split")},
              {"run": str(run), "tests": [f"{test}={spec['real']},{spec['fake']}"], "out": str(run / "eval" / test),
               "force": True}]
    return _settings(EvalConfig, layers, f"{study.source}: study.test_sets.{test}")


def cells(study: Study, out: str | os.PathLike) -> list[Cell]:
    """Every (model, training set), grouped by training set, each with its run folder OUT/runs/MODEL__SET."""
    runs = Path(out).absolute() / RUNS
    pairs = [(model, train_set, runs / f"{model}__{train_set}") for train_set in study.train_sets
             for model in study.models]
    return [Cell(model, train_set, run, _train_settings(study, model, train_set, run))
            for model, train_set, run in pairs]


def missing_paths(study: Study) -> list[str]:
    paths = [spec[key] for sets in (study.train_sets, study.test_sets) for spec in sets.values()
             for key in ("real", "fake")]
    return [path for path in dict.fromkeys(paths) if not Path(path).exists()]


# ----------------------------------------------------------------------------- where a study stands

def _committed(cell: Cell) -> dict[str, Any]:
    """The log line of the run's last committed epoch; {} for none, for a save cut short (`fit` completes it) and for
    a damaged record (`fit` names the damage)."""
    if (cell.run / epoch_commit.STAGING).exists():
        return {}
    try:
        line = _at(epoch_commit.read_manifest(cell.run), "record")
    except InputError:
        return {}
    return line if isinstance(line, dict) else {}


def trained(cell: Cell) -> bool:
    """Whether the cell's run has committed an epoch that ends it under the current settings (training's own stop
    rule, `forensics.train.stop_reason`); a limit raised since, or no run yet, mean `fit` has work to do."""
    line = _committed(cell)
    epoch, since_best, best = line.get("epoch"), line.get("epochs_since_best"), line.get("best_val_patch_acc")
    if not isinstance(epoch, int) or not isinstance(since_best, int) or not isinstance(best, (int, float)):
        return False
    return stop_reason(cell.train, epoch, since_best, float(best)) is not None


EVAL_KEY_IGNORES = ("run", "out", "force", "device", "workers", "crop_on", "batch_size", "store")  # paths, speed: not results


def _eval_key(study: Study, cell: Cell, test: str) -> dict[str, Any]:
    """What an eval's results depend on: its settings and the checkpoint, known by its (small) metadata file."""
    cfg = _eval_settings(study, test, cell.run)
    settings = {k: v for k, v in plain(cfg).items() if k not in EVAL_KEY_IGNORES}
    meta = (cell.run / f"{cfg.which}.json").read_bytes()
    return {"settings": settings, "checkpoint": hashlib.sha256(meta).hexdigest()}


def _at(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...`, None where a level is missing or not a mapping (hand-edited or old records)."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def evaluated(study: Study, cell: Cell, test: str, record: dict[str, Any] | None) -> bool:
    """Whether the study record holds this eval, done alike on the same checkpoint, and its results are still there."""
    entry = _at(record, "cells", cell.name, "eval", test)
    if not isinstance(entry, dict) or entry.get("status") != "done" or not trained(cell):
        return False
    return (cell.run / "eval" / test / RESULTS_FILE).is_file() and entry.get("key") == _eval_key(study, cell, test)


def read_record(out: str | os.PathLike) -> dict[str, Any] | None:
    """OUT/study.json, or None when there is none or it does not read as one (its evals are then redone)."""
    path = Path(out) / RECORD
    try:
        record = read_json(path, "a study record") if path.is_file() else None
    except InputError as err:
        log.warning("%s; its evals are done again", err)
        return None
    return record if isinstance(record, dict) and record.get("kind") == KIND else None


def plan(study: Study, out: str | os.PathLike) -> list[str]:
    """The steps a run would take now: `train CELL` and `eval CELL on TEST`, in order."""
    record = read_record(out)
    todo = []
    for cell in cells(study, out):
        if not trained(cell):
            todo.append(f"train {cell.name}")
        todo += [f"eval {cell.name} on {test}" for test in study.test_sets if not evaluated(study, cell, test, record)]
    return todo


def describe(study: Study, out: str | os.PathLike) -> dict[str, Any]:
    """What --dry-run prints: the resolved study, data paths not found, the steps to do; reads, never writes."""
    return {"config": study.source, "out": str(out), "study": study.settings(), "missing": missing_paths(study),
            "cells": [cell.name for cell in cells(study, out)], "todo": plan(study, out)}


# ----------------------------------------------------------------------------- running it

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _start_record(out: Path, study: Study, grid: list[Cell]) -> dict[str, Any]:
    """This run's record: the earlier one's start, runs, and the train and eval entries of cells still in the study."""
    old = read_record(out) or {}
    runs = old["runs"] if isinstance(old.get("runs"), list) else []
    record = {"kind": KIND, "settings": plain(study.settings()), "status": "running",
              "started": old.get("started") or _now(), "finished": None,
              "runs": [*runs, {"started": _now(), "ended": None, "status": "running"}], "cells": {}, "table": []}
    for cell in grid:
        train, evals = _at(old, "cells", cell.name, "train"), _at(old, "cells", cell.name, "eval") or {}
        record["cells"][cell.name] = {
            "model": cell.model, "train_set": cell.train_set, "run": f"{RUNS}/{cell.name}",
            "train": dict(train) if isinstance(train, dict) else {"status": "pending"},
            "eval": {test: evals[test] for test in study.test_sets if isinstance(_at(evals, test), dict)}}
    return record


def _check_resumable(cell: Cell) -> None:
    """Refuse, before any work, a cell whose run was trained with settings a resume may not change."""
    saved = cell.run / runfolder.RECORD
    if saved.is_file():
        runfolder.refuse_changes(cell.run, configs.read_yaml(saved), cell.train, RESUMABLE_CHANGES,
                                 hint=f"; the study's settings of {cell.name} changed since it was trained: restore "
                                      "them, or choose another --out")


def _train(cell: Cell, entry: dict[str, Any], say: Callable[[str], None], save: Callable[[], None],
           on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
    if trained(cell):
        if entry.get("status") != "done":
            entry.update(status="done", **_progress(cell))
        say(f"[train] {cell.name}: trained earlier (epoch {entry.get('epochs')}), skipped")
        return
    resume = (cell.run / runfolder.RECORD).is_file()
    entry.update(status="running", started=_now(), resumed=resume)
    save()
    start = time.perf_counter()
    summary = fit(cell.train, resume=resume, on_epoch_end=on_epoch_end)
    entry.update(status="done", finished=_now(), stop_reason=summary.get("stop_reason"), **_progress(cell))
    save()
    say(f"[train] {cell.name}: {'resumed, ' if resume else ''}{entry['epochs']} epochs, best val patch accuracy "
        f"{entry['best_val_patch_acc']:.4f} at epoch {entry['best_epoch']} ({time.perf_counter() - start:.1f} s)")


def _progress(cell: Cell) -> dict[str, Any]:
    line = _committed(cell)
    return {"epochs": line.get("epoch"), **{key: line.get(key) for key in ("best_epoch", "best_val_patch_acc")}}


def _evaluate(study: Study, cell: Cell, test: str, record: dict[str, Any], say: Callable[[str], None],
              save: Callable[[], None]) -> None:
    evals = record["cells"][cell.name]["eval"]
    if evaluated(study, cell, test, record):
        say(f"[ eval] {cell.name} on {test}: done earlier, skipped")
        return
    cfg = _eval_settings(study, test, cell.run)
    evals[test] = {"status": "running", "started": _now()}
    save()
    start = time.perf_counter()
    metrics = run_eval(cfg)["results"][test][cfg.aggregation]
    evals[test].update(status="done", finished=_now(), key=_eval_key(study, cell, test),
                       out=f"{RUNS}/{cell.name}/eval/{test}", ap=metrics["ap"], acc=metrics["acc"])
    save()
    say(f"[ eval] {cell.name} on {test}: AP {metrics['ap']:.4f}, accuracy {metrics['acc']:.4f} "
        f"({time.perf_counter() - start:.1f} s)")


def study_table(study: Study, out: str | os.PathLike) -> Table:
    """The study's table from the eval results: a row per cell, grouped by training set (rows are named after the
    model alone when there is one training set, else `MODEL (TRAINING SET)`), a column per test set."""
    results = []
    for cell in cells(study, out):
        found = {}
        for test in study.test_sets:
            path = cell.run / "eval" / test / RESULTS_FILE
            summary = read_json(path, "eval results") if path.is_file() else None
            if isinstance(_at(summary, "results", test), dict):
                found[test] = summary["results"][test]
        name = cell.model if len(study.train_sets) == 1 else f"{cell.model} ({cell.train_set})"
        results.append(Result(name, cell.run / "eval", {"results": found}))
    seen = [test for test in study.test_sets if any(test in r.summary["results"] for r in results)]
    return build_table(results, metric=study.table["metric"], aggregation=study.eval.get("aggregation",
                       EvalConfig.aggregation), columns=seen, digits=study.table["digits"])


def run_study(study: Study, out: str | os.PathLike, *, echo: Callable[[str], None] | None = None,
              on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train what is missing, evaluate what is not up to date, then write OUT/table.{md,csv,tex}.

    OUT holds one study (its config.yaml, a lock while it runs); OUT/study.json records the resolved study, each
    cell's training and evals and when the study started and ended, rewritten atomically after every step. A run
    stopped anywhere (Ctrl-C, a kill) continues when started again: training resumes from its last committed
    epoch, evals already done with the same settings on the same checkpoint are kept. `on_epoch_end` goes to `fit`.
    Returns {"out", "table" (the Table), "files" (the table files), "markdown", "record"}.
    """
    say = echo or log.info
    if missing := missing_paths(study):
        raise InputError(f"{study.source}: data not found: {', '.join(missing)} (relative paths are read from "
                         f"{os.getcwd()}); edit the study's train_sets and test_sets")
    grid = cells(study, out)
    for cell in grid:
        _check_resumable(cell)
    out = FOLDER.claim(out, study.settings(), resume=True)
    record: dict[str, Any] = {}

    def save() -> None:
        write_json(out / RECORD, record)

    try:
        record.update(_start_record(out, study, grid))
        save()
        for cell in grid:
            _train(cell, record["cells"][cell.name]["train"], say, save, on_epoch_end)
            for test in study.test_sets:
                _evaluate(study, cell, test, record, say, save)
        table = study_table(study, out)
        files = write_tables(table, list(FORMATS), out / TABLE)
        record.update(status="done", finished=_now(), table=[path.name for path in files])
        record["runs"][-1].update(ended=_now(), status="done")
        save()
        return {"out": str(out), "table": table, "files": [str(path) for path in files],
                "markdown": RENDERERS["md"](table), "record": record}
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if not record:
            raise
        record.update(status=status)
        record["runs"][-1].update(ended=_now(), status=status, **({"error": str(err)} if status == "failed" else {}))
        with contextlib.suppress(Exception):  # never hide the error itself (a full disk, say)
            save()
        raise
    finally:
        runfolder.release(out)
