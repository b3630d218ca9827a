"""Hostile files through every entry point that reads them: one table, one test.

`tests/data/hostile/make_hostile.py` builds every file into a temporary folder. Each row of `CASES` names a
file, the entry points it goes through and what patchscope must do:

* ``refused`` - exit code 2 and exactly one line `error: PATH: ...` naming the file (the library calls raise
  `InputError`, which the commands print so);
* ``read``    - a valid network with an attacker's code inside (TF `build_module_src`, NVlabs `module_src`),
  a link to a good file, or a run folder that `report` shows: exit 0, the code left as text.

Always: no traceback, no payload run (a payload would create `CANARY_<case>` beside the files), the files
unchanged and nothing created outside --out; `report` pages hold markup only escaped. Rows marked `bounded`
aim at memory or time (declared sizes, sparse files, /dev/zero, FIFOs): they run in a child process under
RLIMIT_AS (3 GiB above what the interpreter holds after its imports) and a timeout, so an exhausting bug
fails as a crash and a hang as a timeout. The README's "Hostile files" table is generated from `CASES`.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data.hostile.make_hostile import canaries, canary, make_hostile, make_payloads
from tests.data.hostile.runner import naive_loads, run_bounded, run_entry
from tests.data.hostile.runs import ESCAPE

README = Path(__file__).resolve().parents[1] / "README.md"

GENERATOR = ("load_generator", "sample", "prepare", "invert", "exaggerate", "finetune", "retrain")
CLASSIFIER = ("load_classifier", "eval", "patches", "exaggerate", "finetune", "retrain")


@dataclass(frozen=True)
class Case:
    name: str
    file: str        # under the hostile folder: gen/ (generator checkpoints), runs/ (classifier runs), report/
    input: str       # what the file is (README)
    entries: tuple   # entry points it goes through
    outcome: str     # "refused" | "read"
    expect: str      # refused: regex the error line matches; read: regex the report page holds (or "")
    does: str        # what patchscope does (README)
    bounded: bool = False

    @property
    def role(self) -> str:
        return "generator" if self.file.startswith("gen/") else "classifier"


def _gen(file: str, input: str, entries: tuple, expect: str, does: str, outcome: str = "refused",
         bounded: bool = False) -> Case:
    return Case(file.split(".")[0], f"gen/{file}", input, entries, outcome, expect, does, bounded)


def _run(name: str, input: str, entries: tuple, expect: str, does: str, outcome: str = "refused",
         bounded: bool = False, folder: str = "runs", case: str = "") -> Case:
    return Case(case or (name if folder == "runs" else f"report_{name}"), f"{folder}/{name}", input, entries,
                outcome, expect, does, bounded)


NOT_GENERATOR = "not a generator checkpoint of a known format"
UNREADABLE_PICKLE = r"not a readable pickle \("
SAFE_LOADER = r"refused by the safe loader \(it names "
UNREADABLE_ST = r"best\.safetensors: unreadable safetensors file \("
LOADG, LOADC = ("load_generator",), ("load_classifier",)
CASES = [
    # ---- pickles whose globals look harmless, and plain ones
    _gen("pickle_os_system.pkl", "a pickle calling `os.system`", GENERATOR,
         NOT_GENERATOR + r" \(found a pickled os\.system\)", "refused: the call is kept as an inert record, not made"),
    _gen("pickle_getattr.pkl", "`builtins.getattr(__import__('os'), 'system')(cmd)`", LOADG + ("sample",),
         UNREADABLE_PICKLE, "refused: `getattr` is not allowed, its stand-in cannot be called"),
    _gen("pickle_partial_eval.pkl", "`functools.partial(builtins.eval, code)()`", LOADG + ("invert",),
         UNREADABLE_PICKLE, "refused: `functools.partial` is not allowed"),
    _gen("pickle_partial_system.pkl", "`functools.partial(os.system, cmd)()` under `netG`", LOADG + ("finetune",),
         UNREADABLE_PICKLE, "refused: `functools.partial` is not allowed"),
    _gen("pickle_rebuild_payload.pkl", "`torch._utils._rebuild_tensor_v2` given an `os.system` call as storage",
         LOADG + ("sample",), "tensor rebuilt from something that is not a storage", "refused, the call never made"),
    _gen("pickle_rebuild_out_of_bounds.pkl", "`_rebuild_tensor_v2`: 4 floats viewed as 2^20 x 2^20",
         LOADG + ("sample",), UNREADABLE_PICKLE, "refused before allocating", bounded=True),
    _gen("pickle_rebuild_stride0.pkl", "`_rebuild_tensor_v2`: a 2^40-element stride-0 view of 4 floats",
         LOADG + ("exaggerate",), "declares 4398046511104 bytes but holds 16", "refused before allocating",
         bounded=True),
    _gen("pickle_numpy_object.pkl", "`numpy.core.multiarray._reconstruct`: object dtype over 8 raw bytes (a forged "
         "pointer)", LOADG + ("prepare",), "numpy arrays of object dtype", "refused before numpy reads it"),
    _gen("pickle_numpy2_object.pkl", "the same through `numpy._core.multiarray._reconstruct`", LOADG + ("sample",),
         "numpy arrays of object dtype", "refused before numpy reads it"),
    _gen("pickle_numpy_object_list.pkl", "an object array holding an `os.system` call", LOADG + ("retrain",),
         "numpy arrays of object dtype", "refused: no object arrays at all"),
    _gen("pickle_ordereddict_shadow.pkl", "an `OrderedDict` whose BUILD state replaces `get`, `items`, `keys`, "
         "`__reduce__`", LOADG + ("sample",), r"replaces its method 'get'", "refused before any method is called"),
    # ---- torch zips (`torch.save` format) whose data.pkl is hostile
    _gen("zip_os_system.pt", "torch zip whose data.pkl calls `os.system`", GENERATOR, SAFE_LOADER + r"os\.system",
         "refused by `torch.load(weights_only=True)`, named"),
    _gen("zip_getattr.pt", "torch zip: `getattr(__import__('os'), 'system')(cmd)`", LOADG + ("sample",),
         "not a readable torch checkpoint", "refused by `torch.load(weights_only=True)`"),
    _gen("zip_partial_eval.pt", "torch zip: `functools.partial(eval, code)()`", LOADG + ("invert",),
         "not a readable torch checkpoint", "refused by `torch.load(weights_only=True)`"),
    _gen("zip_ordereddict_shadow.pt", "torch zip: the `OrderedDict` with shadowed methods (torch accepts it)",
         LOADG + ("finetune",), r"replaces its method 'get'", "refused before any method is called"),
    _gen("zip_zoo_2_40_view.pt", "a zoo .pt whose weight is a 2^40-element view of 4 floats",
         LOADG + ("sample", "finetune"), "declares 4398046511104 bytes but holds 16", "refused before allocating",
         bounded=True),
    _gen("zip_zoo_2_40_storage.pt", "a zoo .pt whose storage declares 2^40 elements and holds 4",
         LOADG + ("sample",), "declares 4398046511104 bytes but its record holds 16", "refused before allocating",
         bounded=True),
    _gen("npz_object.npz", "an .npz with an object array holding an `os.system` call", LOADG + ("sample",),
         "not a readable torch checkpoint", "refused, never unpickled"),
    # ---- TF PGAN / StyleGAN and NVlabs pickles
    _gen("tf_pgan_stub.pkl", "TF PGAN networks (`dnnlib.tflib.network.Network` state) with code in "
         "`build_module_src`, no variables", LOADG + ("sample", "finetune"), r"pgan_tf: expected a D_paper network",
         "refused; the source is never run"),
    _gen("tf_stylegan_stub.pkl", "TF StyleGAN networks whose `build_func_name` is `os.system`",
         LOADG + ("sample", "exaggerate"), r"found build function 'os\.system'", "refused: not a G_style network"),
    _gen("tf_pgan_src.pkl", "a real TF PGAN with code put in its `build_module_src`", LOADG + ("sample",), "",
         "read; the code stays text", outcome="read"),
    _gen("tf_stylegan_src.pkl", "a real TF StyleGAN with code in `build_module_src`", LOADG + ("sample",), "",
         "read; the code stays text", outcome="read"),
    _gen("nvlabs_src.pkl", "a real NVlabs stylegan2-ada pickle with code in `module_src`", LOADG + ("sample",), "",
         "read; the code stays text", outcome="read"),
    _gen("nvlabs_class_path.pkl", "NVlabs records with `class_name: os.system` and code in `module_src`",
         LOADG + ("sample", "retrain"), r"'G_ema' is not a StyleGAN2 generator",
         "refused: no StyleGAN2 weights; the source never run"),
    _gen("nvlabs_get_obj_by_name.pkl", "`G_ema` = `dnnlib.util.get_obj_by_name('os.system')(cmd)`",
         LOADG + ("sample",), UNREADABLE_PICKLE, "refused: `dnnlib` is never imported"),
    _gen("safetensors_2_40.safetensors", "a .safetensors declaring a 2^40-element tensor, as a generator",
         LOADG + ("sample",), r"a safetensors file \(a classifier\?\), not a generator checkpoint",
         "refused from its header", bounded=True),
    # ---- links
    _gen("link_regular.pt", "a symlink to a good zoo PGAN", LOADG + ("sample", "prepare"), "",
         "read: links are followed to regular files", outcome="read"),
    _gen("link_dev_zero.pt", "a symlink to /dev/zero", LOADG + ("sample", "invert"),
         "a character device, not a regular file", "refused unread", bounded=True),
    _gen("link_fifo.pt", "a symlink to a FIFO", LOADG + ("sample", "prepare"),
         r"a FIFO \(named pipe\), not a regular file", "refused, not waited on", bounded=True),
    # ---- classifier runs: weights whose header lies
    _run("st_offsets_past_end", "best.safetensors: data offsets past the end", LOADC + ("eval",), UNREADABLE_ST,
         "refused by the safetensors reader"),
    _run("st_header_past_end", "best.safetensors: header length larger than the file", LOADC + ("patches",),
         UNREADABLE_ST, "refused by the safetensors reader"),
    _run("st_dtype_shape_mismatch", "best.safetensors: F32 [2, 3] over 16 bytes", LOADC + ("eval",),
         UNREADABLE_ST, "refused by the safetensors reader"),
    _run("st_huge_header_length", "best.safetensors: header length 2^63 - 1", LOADC + ("eval",), UNREADABLE_ST,
         "refused by the safetensors reader", bounded=True),
    _run("st_2_40_tensor", "best.safetensors declaring a 2^40-element tensor", LOADC + ("exaggerate",),
         UNREADABLE_ST, "refused by the safetensors reader",
         bounded=True),
    _run("st_sparse", "best.safetensors: a sparse 3.5 GiB file", LOADC + ("eval",),
         r"best\.safetensors: 3758096384 bytes, more than the \d+ expected", "refused unread", bounded=True),
    _run("pickle_as_safetensors", "best.safetensors: a torch zip calling `os.system`", CLASSIFIER, UNREADABLE_ST,
         "refused, never unpickled"),
    _run("run_link_dev_zero", "best.safetensors: a symlink to /dev/zero", LOADC + ("eval",),
         r"best\.safetensors: no classifier checkpoint here", "refused unread", bounded=True),
    _run("run_link_fifo", "best.json: a symlink to a FIFO", LOADC + ("eval",), r"a FIFO \(named pipe\), not a regular "
         "file", "refused, not waited on", bounded=True),
    _run("run_link_regular", "best.* symlinks to a good run", LOADC + ("eval",), "",
         "read: links are followed to regular files", outcome="read"),
    # ---- classifier runs: metadata with an attacker's values
    _run("json_script_model", "best.json: `<script>` as model name, epoch and keys", CLASSIFIER,
         r"best\.json: unknown model", "refused: not a known model name"),
    _run("json_script_model", "the same run folder, `report`", ("report",), "&lt;script&gt;",
         "page written, the markup escaped", outcome="read", case="json_script_model_report"),
    _run("json_dotdot_model", "best.json: `../` in the model name and paths", LOADC + ("eval", "retrain"),
         r"best\.json: unknown model '\.\./", "refused; nothing written by those names"),
    _run("json_huge_numbers", "best.json: epoch 10^400, load_size 10^30", LOADC + ("patches",),
         r"best\.json: config load_size=1000000000000000000000000000000", "refused: sizes must be 1 to 8192"),
    _run("json_wrong_types", "best.json: model a dict, config a string, format_version a list",
         LOADC + ("finetune",), r"best\.json: format_version \[1\]", "refused, field by field"),
    _run("json_deep", "best.json: 100,000 nested lists", LOADC + ("eval",), r"best\.json: JSON nested too deeply",
         "refused before anything recurses"),
    _run("json_sparse", "best.json: a sparse 5 GiB file", LOADC + ("eval",),
         r"best\.json: 5368709120 bytes, more than the 16777216 expected", "refused unread", bounded=True),
    # ---- run folders for `report`
    _run("hostile_values", "results with `<script>`, `../` names, 10^400, NaN, wrong types", ("report",),
         "&lt;script&gt;", "page written, markup escaped, odd values shown as text", outcome="read",
         folder="report"),
    _run("deep", "best.json, metrics.jsonl, metrics.json nested 100,000 deep or with a 5001-digit number",
         ("report",), "nested too deeply", "page written; each file named in a note", outcome="read",
         folder="report"),
    _run("fifos", "best.json, metrics.jsonl, config.yaml, metrics.json, pr_curve.png as FIFOs", ("report",),
         r"not a regular file", "page written, FIFOs not waited on", outcome="read", folder="report",
         bounded=True),
    _run("sparse", "metrics.jsonl, config.yaml, metrics.json, pr_curve.png: sparse 5 GiB files", ("report",),
         r"more than the \d+ expected", "page written, the files named unread", outcome="read",
         folder="report", bounded=True),
]


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="session")
def hostile(tmp_path_factory) -> Path:
    if not sys.platform.startswith("linux"):
        pytest.skip("FIFOs, /dev/zero and RLIMIT_AS are Linux's")
    return make_hostile(tmp_path_factory.mktemp("hostile") / "files")


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed) with its size and mtime."""
    entries = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            info = os.lstat(os.path.join(top, name))
            entries[os.path.join(top, name)] = (info.st_size, info.st_mtime_ns)
    return entries


def check(case: Case, entry: str, result: dict, hostile: Path, out: Path) -> None:
    where = f"{case.name} through {entry}"
    assert result["exception"] is None, f"{where}: {result['exception']}"
    assert "Traceback" not in result["stderr"], f"{where}: {result['stderr']}"
    assert canaries(hostile) == [], f"{where}: a payload ran"
    above = [*out.parents, *(hostile / case.file).parents]  # where a `../` name would have written
    assert not [p for p in above if (p / ESCAPE).exists()], f"{where}: a `../` name was written to"
    errors = [line for line in result["stderr"].splitlines() if line.startswith(("error: ", "Error: "))]
    if case.outcome == "refused":
        assert result["code"] == 2, f"{where}: exit {result['code']}: {result['stderr'][-2000:]}"
        assert len(errors) == 1, f"{where}: {result['stderr'][-2000:]}"
        assert str(hostile / case.file) in errors[0] and re.search(case.expect, errors[0]), f"{where}: {errors[0]}"
        return
    assert result["code"] == 0 and not errors, f"{where}: exit {result['code']}: {result['stderr'][-2000:]}"
    if entry == "report":
        page = (out / "report.html").read_text(encoding="utf-8")
        assert "<script" not in page.lower() and "<img src=x" not in page, f"{where}: markup reached the page"
        assert re.search(case.expect, page), f"{where}: the page lacks {case.expect!r}"


def _jobs(case: Case, entries, hostile: Path, work: Path) -> list[tuple]:
    return [(entry, case.role, str(hostile / case.file), str(hostile / "good"), str(work / case.name / entry))
            for entry in entries]


def _verify(runs: list[tuple[Case, tuple, dict]], hostile: Path, work: Path, before: tuple[dict, dict]) -> None:
    assert tree(hostile) == before[0], "the hostile files or the good inputs changed"
    for case, (entry, *_, out), result in runs:
        check(case, entry, result, hostile, Path(out))
    created = set(tree(work)) - set(before[1])
    outs = [Path(job[-1]) for _, job, _ in runs]
    outside = [p for p in created if not any(Path(p) == o or o in Path(p).parents or Path(p) in o.parents
                                             for o in outs)]
    assert outside == [], f"written outside --out: {outside}"


IN_PROCESS = [pytest.param(case, entry, id=f"{case.name}-{entry}")
              for case in CASES if not case.bounded for entry in case.entries]


@pytest.mark.parametrize("case, entry", IN_PROCESS)
def test_hostile_file(case: Case, entry: str, hostile: Path, tmp_path: Path) -> None:
    if not (hostile / case.file).exists():
        pytest.skip(f"built from the shared generator fixtures, absent here: {case.file}")
    work = tmp_path / "work"
    work.mkdir()
    [job] = _jobs(case, [entry], hostile, work)
    before = (tree(hostile), tree(work))
    _verify([(case, job, run_entry(*job))], hostile, work, before)


def test_hostile_files_in_bounded_memory_and_time(hostile: Path, tmp_path: Path) -> None:
    """The `bounded` rows, all in one child (an interpreter start costs seconds): each job under the child's
    memory limit and its own alarm."""
    work = tmp_path / "work"
    work.mkdir()
    runs = [(case, job) for case in CASES if case.bounded for job in _jobs(case, case.entries, hostile, work)]
    before = (tree(hostile), tree(work))
    results = run_bounded([job for _, job in runs])
    _verify([(case, job, result) for (case, job), result in zip(runs, results)], hostile, work, before)


def test_the_payloads_are_live_under_a_naive_loader(tmp_path: Path) -> None:
    """The control: read naively, each payload does run (and only touches its canary), so "no canary" above
    means patchscope ran nothing."""
    root = make_payloads(tmp_path / "payloads")
    for case, load in naive_loads(root / "gen").items():
        try:
            load()
        except Exception:  # the payload ran first; what it returned need not make a valid object
            pass
        assert canary(root, case).exists(), f"{case}: the payload did not run under a naive loader"
    assert {path.name for path in canaries(root)} <= {f"CANARY_{c.name}" for c in CASES}


# ----------------------------------------------------------------------------- the README table

def entry_label(case: Case, entry: str) -> str:
    if entry in ("exaggerate", "finetune", "retrain"):
        return f"`{entry} --{case.role}`"
    return f"`{entry}`"


def readme_table() -> str:
    entries = {entry_label(case, entry) for case in CASES for entry in case.entries}
    runs = sum(len(case.entries) for case in CASES)
    refused = sum(case.outcome == "refused" for case in CASES)
    lines = [f"{len(CASES)} cases, {runs} runs through {len(entries)} entry points: {refused} files refused, "
             f"{len(CASES) - refused} read as they should be (code inside left as text, markup escaped). Code run: 0. "
             "Data lost (an input changed, a file written outside --out): 0.", "",
             "| Case | Hostile file | Entry points | Outcome | What patchscope does |", "|---|---|---|---|---|"]
    for case in CASES:
        outcome = "refused, exit 2" if case.outcome == "refused" else "read, exit 0"
        bound = " (bounded)" if case.bounded else ""
        used = ", ".join(entry_label(case, entry) for entry in case.entries)
        lines.append(f"| `{case.name}` | {case.input} | {used} | {outcome}{bound} | {case.does} |")
    return "\n".join(lines) + "\n"


def test_the_readme_table_matches_the_cases():
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- hostile-files table: begin -->\n", "<!-- hostile-files table: end -->"
    assert start in text and end in text, "README.md lacks the Hostile files table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == readme_table(), "regenerate: python -c 'from tests.test_hostile_files " \
                                    "import readme_table; print(readme_table())'"
