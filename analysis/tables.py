"""Paper-style results tables from `patchscope eval` results: rows = runs, columns = test sets.

`patchscope table` reads the `metrics.json` that `forensics.evaluate.evaluate` writes (per test set, per
aggregation: ap, acc, ...) and renders one table as Markdown, CSV or LaTeX. Values are percentages; the
best value of each column (after rounding, among two or more values) is bold in Markdown and LaTeX and
named in the CSV's `best` column; a missing value (no such test set in a run, or NaN) is "–" in Markdown,
"--" (an en dash) in LaTeX and an empty cell in CSV, so CSV columns stay numeric.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Sequence

from patchscope.common.atomic import write_text
from patchscope.common.errors import InputError
from patchscope.common.userfiles import read_json
from patchscope.forensics.scoring import AGGREGATIONS

METRICS = ("ap", "acc")
METRIC_CHOICES = ("ap", "acc", "both")
FORMATS = ("md", "csv", "latex")
SUFFIXES = {"md": ".md", "csv": ".csv", "latex": ".tex"}
METRIC_LABELS = {"ap": "AP", "acc": "acc"}
METRIC_WORDS = {"ap": "AP", "acc": "accuracy at 0.5"}
AGGREGATION_WORDS = {"after_softmax": "mean patch P(fake), the paper's",
                     "before_softmax": "softmax of the mean patch logits",
                     "vote": "share of patches voting fake"}
MISSING = {"md": "–", "latex": "--", "csv": ""}
RESULTS_FILE = "metrics.json"
WHAT = "eval results (the metrics.json that `patchscope eval` writes)"


@dataclass(frozen=True)
class Result:
    """One row's source: its name, the metrics.json it came from and that file's contents."""
    name: str
    path: Path
    summary: dict[str, Any]


# ----------------------------------------------------------------------------- finding results

def _is_eval_summary(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("results"), dict)


def _read_summary(path: Path) -> dict[str, Any]:
    summary = read_json(path, WHAT)
    if not _is_eval_summary(summary):
        raise InputError(f"{path}: not {WHAT}: no 'results' mapping of test sets")
    return summary


def find_results(path: str | os.PathLike) -> list[Path]:
    """The eval metrics.json files `path` names: the file itself; a folder's own metrics.json; else every
    eval metrics.json below the folder, in path order (hidden folders skipped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; expected {WHAT} or a folder holding them")
    if not path.is_dir():
        return [path]
    if _is_eval_summary(_try_json(path / RESULTS_FILE)):
        return [path / RESULTS_FILE]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if RESULTS_FILE in files and _is_eval_summary(_try_json(Path(folder, RESULTS_FILE))):
            found.append(Path(folder, RESULTS_FILE))
    if not found:
        raise InputError(f"{path}: holds no {WHAT}")
    return sorted(found, key=lambda p: p.parts)


def _try_json(path: Path) -> Any:
    """A metrics.json's contents, or None where it is missing or is not JSON (another stage's file, a torn one)."""
    if not path.is_file():
        return None
    try:
        return read_json(path, WHAT)
    except InputError:
        return None


def run_name(summary: dict[str, Any], path: Path) -> str:
    """A row's default name: the classifier run's folder name as eval recorded it (`run`), else the folder
    holding the results (its parent when that folder is the default `eval`)."""
    run = summary.get("run")
    if isinstance(run, str) and run.strip():
        run_path = PurePath(run.strip().rstrip("/\\"))
        if run_path.suffix in (".safetensors", ".json"):
            name = run_path.parent.name if run_path.stem in ("best", "last") else run_path.stem
        else:
            name = run_path.name
        if name and name not in (".", ".."):
            return name
    folder = path.resolve().parent
    return folder.parent.name if folder.name == "eval" else folder.name


def _split_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a spec that exists as a path, or has no `=`, is a path."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        return None, spec
    if not name or not path:
        raise InputError(f"{spec!r}: expected PATH or NAME=PATH")
    return name, path


def load_results(specs: Sequence[str]) -> list[Result]:
    """Every result the specs name, in order, each file once; duplicate default names get their results
    folder's name added, and names still equal are refused (name them with NAME=PATH)."""
    if not specs:
        raise InputError(f"no results given (expected {WHAT}, folders holding them, or NAME=PATH)")
    rows: list[Result] = []
    seen: set[Path] = set()
    explicit: set[int] = set()
    for spec in specs:
        name, path = _split_spec(spec)
        files = find_results(path)
        if name is not None and len(files) > 1:
            raise InputError(f"{spec}: NAME=PATH names one row, but {path} holds {len(files)} eval results "
                             f"({', '.join(str(f) for f in files[:3])}...); name each metrics.json instead")
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            summary = _read_summary(file)
            if name is not None:
                explicit.add(len(rows))
            rows.append(Result(name if name is not None else run_name(summary, file), file, summary))
    return _unique_names(rows, explicit)


def _unique_names(rows: list[Result], explicit: set[int]) -> list[Result]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.name] = counts.get(row.name, 0) + 1
    renamed = [Result(f"{row.name} ({row.path.resolve().parent.name})", row.path, row.summary)
               if counts[row.name] > 1 and i not in explicit else row for i, row in enumerate(rows)]
    names = [row.name for row in renamed]
    for i, row in enumerate(renamed):
        if names.index(row.name) != i:
            first = renamed[names.index(row.name)]
            raise InputError(f"two rows are both named {row.name!r} ({first.path} and {row.path}); "
                             "give them names with NAME=PATH")
    return renamed


# ----------------------------------------------------------------------------- the table

@dataclass
class Table:
    """Rows x value columns; `values[r][c]` is a percentage rounded to `digits`, or None when missing."""
    caption: str
    aggregation: str
    metrics: tuple[str, ...]          # per test set, in this order
    rows: list[str]
    test_sets: list[str]
    values: list[list[float | None]]  # column c = test set c // len(metrics), metric c % len(metrics)
    best: list[list[bool]]
    digits: int

    @property
    def columns(self) -> list[tuple[str, str]]:
        return [(test, metric) for test in self.test_sets for metric in self.metrics]

    def header(self, test: str, metric: str) -> str:
        return test if len(self.metrics) == 1 else f"{test} {METRIC_LABELS[metric]}"

    def text(self, r: int, c: int, fmt: str) -> str:
        value = self.values[r][c]
        return MISSING[fmt] if value is None else f"{value:.{self.digits}f}"


def _cell(summary: dict[str, Any], test: str, aggregation: str, metric: str) -> float | None:
    per_mode = summary["results"].get(test)
    metrics = per_mode.get(aggregation) if isinstance(per_mode, dict) else None
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ordered(found: list[str], wanted: Sequence[str] | None, what: str, option: str) -> list[str]:
    if not wanted:
        return found
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise InputError(f"{option}: no {what} named {', '.join(map(repr, unknown))}; "
                         f"the results hold {', '.join(map(repr, found))}")
    if len(set(wanted)) != len(wanted):
        raise InputError(f"{option}: a {what} is named twice ({', '.join(wanted)})")
    return list(wanted)


def build_table(results: Sequence[Result], metric: str = "both", aggregation: str = "after_softmax",
                rows: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                digits: int = 1) -> Table:
    """The table of `results`: rows in the given order (or `rows`, which also selects), test sets by first
    appearance (or `columns`); values in percent, rounded to `digits`, the best of each column marked."""
    if metric not in METRIC_CHOICES:
        raise InputError(f"metric {metric!r}: expected one of {', '.join(METRIC_CHOICES)}")
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation {aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    if not isinstance(digits, int) or not 0 <= digits <= 6:
        raise InputError(f"digits {digits!r}: expected an integer from 0 to 6")
    by_name = {result.name: result for result in results}
    row_names = _ordered(list(by_name), rows, "row", "--rows")
    found_tests = list(dict.fromkeys(test for name in row_names for test in by_name[name].summary["results"]))
    test_sets = _ordered(found_tests, columns, "test set", "--columns")
    metrics = METRICS if metric == "both" else (metric,)
    values = []
    for name in row_names:
        cells = [_cell(by_name[name].summary, test, aggregation, m) for test in test_sets for m in metrics]
        values.append([None if v is None else round(100.0 * v, digits) for v in cells])
    best = [[False] * len(row) for row in values]
    for c in range(len(test_sets) * len(metrics)):
        present = [row[c] for row in values if row[c] is not None]
        if len(present) >= 2:
            top = max(present)
            for r, row in enumerate(values):
                best[r][c] = row[c] == top
    words = " and ".join(METRIC_WORDS[m] for m in metrics)
    caption = (f"{words[0].upper() + words[1:]} (%) on each test set; image score: {aggregation} "
               f"({AGGREGATION_WORDS[aggregation]}). Best per column in bold.")
    return Table(caption, aggregation, metrics, row_names, test_sets, values, best, digits)


# ----------------------------------------------------------------------------- rendering

def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    """`Table: caption`, a blank line, then a pipe table (the caption line is pandoc's table caption)."""
    head = ["model"] + [table.header(t, m) for t, m in table.columns]
    lines = [f"Table: {table.caption}", "", "| " + " | ".join(_md_escape(h) for h in head) + " |",
             "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|"]
    for r, name in enumerate(table.rows):
        cells = [f"**{table.text(r, c, 'md')}**" if table.best[r][c] else table.text(r, c, "md")
                 for c in range(len(table.columns))]
        lines.append("| " + " | ".join([_md_escape(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """model, aggregation, one column per value, then `best`: the value columns (by header, `; `-separated)
    in which this row holds the best value."""
    headers = [table.header(t, m) for t, m in table.columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "aggregation", *headers, "best"])
    for r, name in enumerate(table.rows):
        best = "; ".join(h for c, h in enumerate(headers) if table.best[r][c])
        writer.writerow([name, table.aggregation, *(table.text(r, c, "csv") for c in range(len(headers))), best])
    return buffer.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs `table` environment; with two metrics, each test set spans an AP and an acc column."""
    n = len(table.metrics)
    lines = ["% needs \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
             f"\\caption{{{latex_escape(table.caption)}}}",
             f"\\begin{{tabular}}{{l{'c' * len(table.columns)}}}", "\\toprule"]
    if n == 1:
        lines.append(" & ".join(["Model", *(latex_escape(t) for t in table.test_sets)]) + " \\\\")
    else:
        spans = [f"\\multicolumn{{{n}}}{{c}}{{{latex_escape(t)}}}" for t in table.test_sets]
        lines.append(" & ".join(["", *spans]) + " \\\\")
        rules = [f"\\cmidrule(lr){{{2 + i * n}-{1 + (i + 1) * n}}}" for i in range(len(table.test_sets))]
        lines.append(" ".join(rules))
        labels = [METRIC_LABELS[m] for _ in table.test_sets for m in table.metrics]
        lines.append(" & ".join(["Model", *labels]) + " \\\\")
    lines.append("\\midrule")
    for r, name in enumerate(table.rows):
        cells = [f"\\textbf{{{table.text(r, c, 'latex')}}}" if table.best[r][c] else table.text(r, c, "latex")
                 for c in range(len(table.columns))]
        lines.append(" & ".join([latex_escape(name), *cells]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "latex": to_latex}


def write_tables(table: Table, formats: Sequence[str], prefix: str | os.PathLike) -> list[Path]:
    """PREFIX.md / PREFIX.csv / PREFIX.tex for each format, atomically (a suffix given on PREFIX is dropped)."""
    prefix = Path(prefix)
    if prefix.suffix in SUFFIXES.values():
        prefix = prefix.with_suffix("")
    paths = {fmt: prefix.with_name(prefix.name + SUFFIXES[fmt]) for fmt in formats}
    for path in paths.values():
        if path.is_dir():
            raise InputError(f"{path}: is a folder; --out is a file name prefix")
    for fmt, path in paths.items():
        write_text(path, RENDERERS[fmt](table))  # atomic_open creates the folder
    return list(paths.values())
