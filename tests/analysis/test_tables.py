"""`patchscope table`: eval results -> one paper-style table, checked against tables written by hand in
Markdown, CSV and LaTeX; the fixture files have the exact format eval writes (checked against a real eval)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.analysis.tables import build_table, load_results, to_csv, to_latex, to_markdown
from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.models import build_model

AGGREGATIONS = ("after_softmax", "before_softmax", "vote")


def run(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def metrics(ap: float, acc: float) -> dict[str, float | int]:
    """One aggregation's metrics with every key eval writes."""
    return {"n": 100, "n_real": 50, "n_fake": 50, "ap": ap, "ap_real": 0.5, "roc_auc": 0.5, "acc": acc,
            "acc_real": acc, "acc_fake": acc, "patch_ap": 0.5, "patch_ap_real": 0.5, "patch_acc": 0.5}


def summary(run_path: str, results: dict[str, tuple[float, float]]) -> dict:
    """metrics.json as eval writes it; before_softmax and vote get other values (AP - 0.1, accuracy 0.1)."""
    return {"run": run_path, "checkpoint_epoch": 3, "model": "xception_block2", "aggregation": "after_softmax",
            "load_size": 128, "crop_size": 128, "view": "full", "input_size": 128, "split": "test",
            "results": {test: {"after_softmax": metrics(ap, acc), "before_softmax": metrics(ap - 0.1, 0.1),
                               "vote": metrics(ap - 0.1, 0.1)} for test, (ap, acc) in results.items()}}


@pytest.fixture()
def results(tmp_path) -> dict[str, Path]:
    root = tmp_path / "runs"
    files = {"xb1": root / "xb1" / "eval" / "metrics.json", "xb2": root / "xb2" / "eval" / "metrics.json",
             "other": tmp_path / "elsewhere" / "metrics.json"}
    contents = {"xb1": summary("runs/xb1", {"pgan": (0.99951, 0.9633), "sg": (0.8712, 0.7)}),
                "xb2": summary("/data/runs/xb2/best.safetensors", {"sg": (0.9, 0.6549), "glow": (0.75, 0.5)}),
                "other": summary("runs/resnet", {"pgan": (0.99949, 0.9633), "sg": (math.nan, 0.8)})}
    for name, path in files.items():
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(contents[name], indent=2, allow_nan=True))
    (root / "xb1" / "exaggerate").mkdir()
    (root / "xb1" / "exaggerate" / "metrics.json").write_text('{"rows": []}')  # another stage's file: ignored
    (root / "xb1" / "config.yaml").write_text("model: xception_block1\n")
    return {"root": root, "other": files["other"]}


MARKDOWN = """\
Table: AP and accuracy at 0.5 (%) on each test set; image score: after_softmax (mean patch P(fake), the paper's). \
Best per column in bold.

| model | pgan AP | pgan acc | sg AP | sg acc | glow AP | glow acc |
|:---|---:|---:|---:|---:|---:|---:|
| xb1 | **100.0** | **96.3** | 87.1 | 70.0 | – | – |
| xb2 | – | – | **90.0** | 65.5 | 75.0 | 50.0 |
| rn | 99.9 | **96.3** | – | **80.0** | – | – |
"""

CSV = """\
model,aggregation,pgan AP,pgan acc,sg AP,sg acc,glow AP,glow acc,best
xb1,after_softmax,100.0,96.3,87.1,70.0,,,pgan AP; pgan acc
xb2,after_softmax,,,90.0,65.5,75.0,50.0,sg AP
rn,after_softmax,99.9,96.3,,80.0,,,pgan acc; sg acc
"""

LATEX = r"""% needs \usepackage{booktabs}
\begin{table}[t]
\centering
\caption{AP and accuracy at 0.5 (\%) on each test set; image score: after\_softmax (mean patch P(fake), the paper's). Best per column in bold.}
\begin{tabular}{lcccccc}
\toprule
 & \multicolumn{2}{c}{pgan} & \multicolumn{2}{c}{sg} & \multicolumn{2}{c}{glow} \\
\cmidrule(lr){2-3} \cmidrule(lr){4-5} \cmidrule(lr){6-7}
Model & AP & acc & AP & acc & AP & acc \\
\midrule
xb1 & \textbf{100.0} & \textbf{96.3} & 87.1 & 70.0 & -- & -- \\
xb2 & -- & -- & \textbf{90.0} & 65.5 & 75.0 & 50.0 \\
rn & 99.9 & \textbf{96.3} & -- & \textbf{80.0} & -- & -- \\
\bottomrule
\end{tabular}
\end{table}
"""


def test_the_table_reproduces_the_hand_written_one_in_every_format(results, tmp_path):
    specs = [str(results["root"]), f"rn={results['other']}"]
    table = build_table(load_results(specs))
    assert (to_markdown(table), to_csv(table), to_latex(table)) == (MARKDOWN, CSV, LATEX)

    result = run("table", *specs, "--format", "all", "--out", tmp_path / "tables" / "main")
    assert result.exit_code == 0, result.output
    for suffix, expected in ((".md", MARKDOWN), (".csv", CSV), (".tex", LATEX)):
        assert (tmp_path / "tables" / f"main{suffix}").read_text() == expected
    printed = run("table", *specs, "--format", "all")
    assert printed.exit_code == 0 and printed.stdout == "\n".join([MARKDOWN, CSV, LATEX])
    assert run("table", *specs, "--format", "csv").stdout == CSV


def test_rows_columns_metric_and_aggregation(results):
    result = run("table", results["root"], f"rn={results['other']}", "--rows", "rn,xb1", "--columns", "sg,pgan",
                 "--metric", "ap", "--aggregation", "vote", "--digits", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Table: AP (%) on each test set; image score: vote (share of patches voting fake). Best per column in bold.\n"
        "\n| model | sg | pgan |\n|:---|---:|---:|\n| rn | – | **89.95** |\n| xb1 | 77.12 | **89.95** |\n")
    acc = run("table", results["root"], "--metric", "acc", "--format", "csv")
    assert acc.stdout.splitlines() == ["model,aggregation,pgan,sg,glow,best", "xb1,after_softmax,96.3,70.0,,sg",
                                       "xb2,after_softmax,,65.5,50.0,"]


def test_row_names_duplicates_and_errors(results, tmp_path):
    twice = tmp_path / "runs" / "xb1" / "eval_jpeg" / "metrics.json"
    twice.parent.mkdir()
    twice.write_text((results["root"] / "xb1" / "eval" / "metrics.json").read_text())
    names = [row.name for row in load_results([str(results["root"]), str(results["other"])])]
    assert names == ["xb1 (eval)", "xb1 (eval_jpeg)", "xb2", "resnet"]
    # The same file twice is one row; without a run recorded, the folder around eval/ names the row.
    data = json.loads(results["other"].read_text())
    del data["run"]
    bare = tmp_path / "bare" / "eval" / "metrics.json"
    bare.parent.mkdir(parents=True)
    bare.write_text(json.dumps(data))
    assert [r.name for r in load_results([str(bare), str(bare.parent)])] == ["bare"]
    with pytest.raises(InputError, match="both named 'a'"):
        load_results([f"a={bare}", f"a={results['other']}"])
    with pytest.raises(InputError, match="names one row"):
        load_results([f"a={results['root']}"])
    for args, message in [([tmp_path / "nope"], "no such file or folder"),
                          ([tmp_path / "bare" / "eval" / "missing"], "no such file"),
                          ([tmp_path / "runs" / "xb1" / "config.yaml"], "not valid JSON"),
                          ([tmp_path / "runs" / "xb1" / "exaggerate"], "holds no eval results"),
                          ([results["root"], "--rows", "xb9"], "--rows: no row named 'xb9'"),
                          ([results["root"], "--columns", "sg,sg"], "named twice")]:
        result = run("table", *args)
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_the_fixture_format_is_what_eval_writes(builtin_dataset, tmp_path):
    """Eval on tiny data: its metrics.json has the fixture's keys, and the table reads it."""
    run_dir = tmp_path / "runs" / "tiny"
    save_classifier(run_dir / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    real, fake = builtin_dataset / "real", builtin_dataset / "fake"
    result = run("eval", run_dir, "--test", f"b={real},{fake}", "--test", f"c={fake},{real}",
                 "--device", "cpu", "--precision", "fp32", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    written = json.loads((run_dir / "eval" / "metrics.json").read_text())
    fixture = summary("r", {"b": (0.5, 0.5)})
    assert written.keys() == fixture.keys()
    assert written["results"]["b"].keys() == fixture["results"]["b"].keys() == set(AGGREGATIONS)
    assert written["results"]["b"]["vote"].keys() == fixture["results"]["b"]["vote"].keys()

    table = run("table", tmp_path / "runs", "--format", "csv", "--digits", "3")
    assert table.exit_code == 0, table.output
    header, row = table.stdout.splitlines()
    assert header == "model,aggregation,b AP,b acc,c AP,c acc,best"
    values = [written["results"][t]["after_softmax"][m] for t in "bc" for m in ("ap", "acc")]
    assert row == "tiny,after_softmax," + ",".join(f"{round(100 * v, 3):.3f}" for v in values) + ","


def test_help_shows_an_example():
    result = run("table", "--help")
    assert result.exit_code == 0 and "Example:" in result.output and "patchscope table runs/" in result.output
