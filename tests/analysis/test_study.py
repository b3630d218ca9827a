"""`patchscope study`: a small generalisation study (2 models x 2 training sets x 3 test sets, 32 px, CPU fp32) run
end to end, interrupted and resumed to the same table; its config checked in full before any work."""
from __future__ import annotations

import csv
import fcntl
import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image, ImageFilter

from patchscope.analysis import study as study_mod
from patchscope.analysis.study import describe, load_study, plan, read_record, run_study
from patchscope.cli import main
from patchscope.common import config as configs
from patchscope.common.errors import InputError
from patchscope.common.runfolder import LOCK_FILE
from patchscope.configs import FOLDER as CONFIGS
from patchscope.forensics import train as train_mod
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.train import TrainConfig

MODELS = ("xception_block1", "resnet18_layer1")
CELLS = [f"{model}__{train_set}" for train_set in ("a", "b") for model in MODELS]
TESTS = ("a", "b", "blur")


@pytest.fixture(scope="module")
def data(builtin_dataset, tmp_path_factory) -> dict[str, Path]:
    """Training set a: the built-in dataset; b: other crops (another seed); test set blur: a's reals against its
    test fakes blurred."""
    root = tmp_path_factory.mktemp("study_data")
    other = write_builtin_dataset(root / "b", {"train": 64, "val": 16, "test": 32}, size=32, seed=1)
    blur = root / "blur" / "test"
    blur.mkdir(parents=True)
    for path in sorted((builtin_dataset / "fake" / "test").glob("*.png")):
        Image.open(path).filter(ImageFilter.GaussianBlur(1.0)).save(blur / path.name)
    return {"a": builtin_dataset, "b": other, "blur": root / "blur"}


def settings(data: dict[str, Path], **changes) -> dict:
    """The study's YAML contents; `changes` replace whole top-level sections."""
    a, b = data["a"], data["b"]
    text = {
        "train": {"load_size": 32, "crop_size": 32, "batch_size": 16, "max_epochs": 2, "patience": 5, "init": "kaiming",
                  "device": "cpu", "precision": "fp32"},  # the same numbers whatever the CPU's bf16 support
        "eval": {"device": "cpu", "precision": "fp32", "batch_size": 32},
        "study": {"models": {name: {} for name in MODELS},
                  "train_sets": {"a": {"real": str(a / "real"), "fake": str(a / "fake")},
                                 "b": {"real": str(b / "real"), "fake": str(b / "fake")}},
                  "test_sets": {"a": {"real": str(a / "real"), "fake": str(a / "fake"), "split": "test"},
                                "b": {"real": str(b / "real"), "fake": str(b / "fake")},
                                "blur": {"real": str(a / "real"), "fake": str(data["blur"]), "split": "test"}}}}
    text.update(changes)
    return text


def write_config(path: Path, contents: dict) -> Path:
    path.write_text(yaml.safe_dump(contents, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> dict:
    """The study run once, uninterrupted."""
    root = tmp_path_factory.mktemp("study_whole")
    study = load_study(write_config(root / "study.yaml", settings(data)))
    return {"study": study, "out": root / "out", "result": run_study(study, root / "out")}


def table_csv(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "table.csv", newline="") as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def test_a_study_trains_every_cell_scores_every_test_set_and_tables_the_eval_metrics(whole):
    out, result = whole["out"], whole["result"]
    record = json.loads((out / "study.json").read_text())
    assert record["status"] == "done" and record["finished"] and list(record["cells"]) == CELLS
    for name, cell in record["cells"].items():
        assert cell["train"]["status"] == "done" and cell["train"]["epochs"] == 2
        assert sorted(cell["eval"]) == sorted(TESTS) and all(e["status"] == "done" for e in cell["eval"].values())
        assert (out / "runs" / name / "best.safetensors").is_file()
    rows = table_csv(out)
    assert list(rows) == [f"{model} ({train_set})" for train_set in ("a", "b") for model in MODELS]
    for name in CELLS:
        model, train_set = name.split("__")
        for test in TESTS:
            metrics = json.loads((out / "runs" / name / "eval" / test / "metrics.json").read_text())
            values = metrics["results"][test]["after_softmax"]
            assert metrics["run"] == str(out.absolute() / "runs" / name)
            for metric, header in (("ap", f"{test} AP"), ("acc", f"{test} acc")):
                assert rows[f"{model} ({train_set})"][header] == f"{100 * values[metric]:.1f}"
                assert record["cells"][name]["eval"][test][metric] == values[metric]
    assert (out / "table.md").read_text() == result["markdown"]
    assert "\\begin{tabular}" in (out / "table.tex").read_text()
    assert record["table"] == ["table.md", "table.csv", "table.tex"]
    assert yaml.safe_load((out / "config.yaml").read_text())["kind"] == "study"


def test_running_a_finished_study_again_trains_and_evaluates_nothing(whole, monkeypatch):
    study, out = whole["study"], whole["out"]
    assert plan(study, out) == []
    table, runs = (out / "table.md").read_text(), len(read_record(out)["runs"])

    def refuse(*args, **kwargs):
        raise AssertionError("nothing should be redone")

    monkeypatch.setattr(study_mod, "fit", refuse)
    monkeypatch.setattr(study_mod, "run_eval", refuse)
    lines = []
    run_study(study, out, echo=lines.append)
    assert (out / "table.md").read_text() == table
    assert len(lines) == len(CELLS) * (1 + len(TESTS)) and all("skipped" in line for line in lines)
    assert len(read_record(out)["runs"]) == runs + 1


def test_an_interrupted_study_resumes_where_it_stopped_and_ends_with_the_same_table(whole, data, tmp_path,
                                                                                     monkeypatch):
    study = load_study(write_config(tmp_path / "study.yaml", settings(data)))
    out = tmp_path / "out"
    epochs = []

    def stop_in_the_second_run(line):  # after the first run's 2 epochs and evals, the second run's epoch 1
        epochs.append(line["epoch"])
        if len(epochs) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, on_epoch_end=stop_in_the_second_run)
    record = read_record(out)
    assert record["status"] == "interrupted" and record["runs"][-1]["status"] == "interrupted"
    assert record["cells"][CELLS[1]]["train"]["status"] == "running"
    assert plan(study, out)[:2] == [f"train {CELLS[1]}", f"eval {CELLS[1]} on a"]
    assert len(plan(study, out)) == 3 * (1 + len(TESTS))  # the first cell is done

    real_fit, real_eval = study_mod.fit, study_mod.run_eval
    calls = {"fit": [], "eval": []}

    def counted_fit(config, resume=False, **kwargs):
        calls["fit"].append((Path(config.out).name, resume))
        return real_fit(config, resume=resume, **kwargs)

    def eval_then_stop(config):  # the second run resumed and trained to its end; stop in its second eval
        calls["eval"].append(Path(config.out).name)
        if len(calls["eval"]) == 2:
            raise KeyboardInterrupt
        return real_eval(config)

    monkeypatch.setattr(study_mod, "fit", counted_fit)
    monkeypatch.setattr(study_mod, "run_eval", eval_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out)
    assert calls["fit"] == [(CELLS[1], True)]
    assert json.loads((out / "runs" / CELLS[1] / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2

    monkeypatch.setattr(study_mod, "run_eval", lambda config: calls["eval"].append(Path(config.out).name)
                        or real_eval(config))
    calls = {"fit": [], "eval": []}
    result = run_study(study, out)
    assert calls["fit"] == [(CELLS[2], False), (CELLS[3], False)]
    assert calls["eval"] == ["b", "blur"] + 2 * list(TESTS)  # the interrupted eval and what was never started
    assert (out / "table.md").read_text() == (whole["out"] / "table.md").read_text() == result["markdown"]
    assert (out / "table.csv").read_text() == (whole["out"] / "table.csv").read_text()
    for which in ("best", "last"):  # bit for bit, the resumed run included
        for name in CELLS:
            assert (out / "runs" / name / f"{which}.safetensors").read_bytes() == \
                (whole["out"] / "runs" / name / f"{which}.safetensors").read_bytes()
    record = read_record(out)
    assert record["status"] == "done" and [r["status"] for r in record["runs"]] == ["interrupted"] * 2 + ["done"]


def test_changed_settings_redo_the_evals_or_are_refused_before_any_work(whole, data, tmp_path):
    out = whole["out"]
    faster = settings(data, eval={"device": "cpu", "precision": "fp32", "batch_size": 7, "workers": 1})
    assert plan(load_study(write_config(tmp_path / "faster.yaml", faster)), out) == []  # the same scores, faster
    changed_eval = settings(data, eval={"device": "cpu", "precision": "fp32", "batch_size": 32, "aggregation": "vote"})
    todo = plan(load_study(write_config(tmp_path / "eval.yaml", changed_eval)), out)
    assert len(todo) == len(CELLS) * len(TESTS) and all(step.startswith("eval ") for step in todo)
    results = out / "runs" / CELLS[2] / "eval" / "blur" / "metrics.json"
    results.rename(results.with_name("kept.json"))  # results removed since: that eval is done again
    try:
        assert plan(whole["study"], out) == [f"eval {CELLS[2]} on blur"]
    finally:
        results.with_name("kept.json").rename(results)
    longer = settings(data)
    longer["train"] = {**longer["train"], "max_epochs": 3}  # a resume may raise the limit: trains on
    assert [step for step in plan(load_study(write_config(tmp_path / "longer.yaml", longer)), out)
            if step.startswith("train")] == [f"train {name}" for name in CELLS]
    changed_lr = settings(data)
    changed_lr["study"]["models"]["resnet18_layer1"] = {"lr": 0.01}
    before = (out / "study.json").read_bytes()
    with pytest.raises(InputError, match=r"resnet18_layer1__a: cannot resume with different lr \(saved: lr=0.001\)"):
        run_study(load_study(write_config(tmp_path / "lr.yaml", changed_lr)), out)
    assert (out / "study.json").read_bytes() == before


def test_a_dry_run_prints_the_resolved_study_and_the_steps_and_writes_nothing(data, tmp_path):
    config = write_config(tmp_path / "study.yaml", settings(data))
    result = CliRunner().invoke(main, ["study", str(config), "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["todo"][:4] == [f"train {CELLS[0]}", *(f"eval {CELLS[0]} on {t}" for t in TESTS)]
    assert len(printed["todo"]) == len(CELLS) * (1 + len(TESTS)) and printed["missing"] == []
    assert printed["study"]["train_sets"]["b"]["real"] == str(data["b"] / "real")
    assert printed["cells"] == CELLS and sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_the_command_runs_a_study_prints_its_table_and_a_second_process_is_refused(data, tmp_path):
    contents = settings(data, train={**settings(data)["train"], "max_epochs": 1})
    contents["study"].update(models={"xception_block1": {}}, train_sets={"a": contents["study"]["train_sets"]["a"]},
                             test_sets={"blur": contents["study"]["test_sets"]["blur"]})
    config, out = write_config(tmp_path / "study.yaml", contents), tmp_path / "out"
    result = CliRunner().invoke(main, ["study", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[train] xception_block1__a: 1 epochs" in result.output and "| xception_block1 |" in result.output
    assert f"table: {out / 'table.csv'}" in result.output
    fd = os.open(out / LOCK_FILE, os.O_RDWR)  # another process at work in the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(main, ["study", str(config), "--out", str(out)])
    finally:
        os.close(fd)
    assert result.exit_code == 2 and "in use by another patchscope process" in result.stderr


@pytest.mark.parametrize("make, expected", [
    (lambda d: {**d, "studdy": {}}, "unknown key 'studdy'; known: study, train, eval, table"),
    (lambda d: {**d, "study": {**d["study"], "modles": {}}}, "study: unknown key 'modles'"),
    (lambda d: {**d, "study": {**d["study"], "models": {}}}, "study.models: expected a non-empty mapping"),
    (lambda d: {**d, "study": {**d["study"], "models": {"xception_block1": {"lrr": 1}}}},
     "study.models.xception_block1: unknown setting 'lrr'"),
    (lambda d: {**d, "study": {**d["study"], "models": {"no_such_net": {}}}},
     "study.models.no_such_net: setting model='no_such_net': expected one of"),
    (lambda d: {**d, "study": {**d["study"], "models": {"x": {"model": "xception_block1", "out": "r"}}}},
     "study.models.x: out: set by the study"),
    (lambda d: {**d, "train": {"real": "r"}}, "train: real: set by the study"),
    (lambda d: {**d, "study": {**d["study"], "train": {}}}, "`train:` is given twice"),
    (lambda d: {**d, "eval": {"aggregation": "mean"}}, "study.test_sets.a: setting aggregation='mean'"),
    (lambda d: {**d, "table": {"metric": "f1"}}, "table: metric 'f1': expected one of ap, acc, both"),
    (lambda d: {**d, "table": {"format": "md"}}, "table: unknown key 'format'"),
    (lambda d: {**d, "study": {**d["study"], "train_sets": {"a__b": {"real": "r", "fake": "f"}}}}, "name 'a__b'"),
    (lambda d: {**d, "study": {**d["study"], "test_sets": {"../t": {"real": "r", "fake": "f"}}}}, "name '../t'"),
    (lambda d: {**d, "study": {**d["study"], "train_sets": {"a": {"real": "r"}}}},
     "study.train_sets.a.fake=None: expected a path"),
    (lambda d: {**d, "study": {**d["study"], "test_sets": {"t": {"real": "r", "fake": "f", "splt": "test"}}}},
     "study.test_sets.t: unknown key 'splt'"),
    (lambda d: {**d, "study": {**d["study"], "test_sets": {"t": {"real": "r,s", "fake": "f"}}}}, "without a comma"),
])
def test_a_bad_study_config_is_refused_in_one_line_before_any_work(data, tmp_path, make, expected):
    config = write_config(tmp_path / "study.yaml", make(settings(data)))
    with pytest.raises(InputError) as caught:
        load_study(config)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(config))


def test_missing_data_is_named_in_one_line_and_nothing_is_written(data, tmp_path):
    contents = settings(data)
    contents["study"]["train_sets"]["b"]["fake"] = str(tmp_path / "gone")
    contents["study"]["test_sets"]["blur"]["fake"] = "no/such/folder"
    study = load_study(write_config(tmp_path / "study.yaml", contents))
    with pytest.raises(InputError) as caught:
        run_study(study, tmp_path / "out")
    message = str(caught.value)
    assert f"{tmp_path / 'gone'}, {Path('no/such/folder').absolute()}" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert describe(study, tmp_path / "out")["missing"] == [str(tmp_path / "gone"), os.path.abspath("no/such/folder")]


def test_a_folder_of_something_else_is_refused(data, tmp_path):
    study = load_study(write_config(tmp_path / "study.yaml", settings(data)))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a study folder"):
        run_study(study, tmp_path / "notes")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: xception_block1\n")  # a `patchscope train` run
    with pytest.raises(InputError, match="records a None run, not a study"):
        run_study(study, tmp_path / "run")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("paper_*.yaml") if "study" in
                                        configs.read_yaml(p)))
def test_the_paper_configs_are_whole_studies_and_serve_train_config_too(name, monkeypatch):
    path = CONFIGS / name
    names = list(configs.read_yaml(path)["study"]["models"])  # full-model baselines may not be registered yet
    registered = train_mod.model_names()
    monkeypatch.setattr(train_mod, "model_names", lambda: sorted({*registered, *names}))
    study = load_study(path)
    assert len(study.models) >= 5 and len(study.test_sets) >= 4
    for spec in [*study.train_sets.values(), *study.test_sets.values()]:
        relative = Path(spec["real"]).relative_to(Path.cwd())
        assert relative.parts[0] == "data"  # placeholder-free relative paths, read from where the study runs
    assert "patchscope study configs/" + name in path.read_text()
    train = configs.resolve(TrainConfig, configs.read_yaml(path, "train"))  # `patchscope train --config FILE`
    assert (train.load_size, train.crop_size, train.batch_size, train.lr) == (299, 299, 32, 0.001)


def test_the_paper_configs_cover_the_papers_models_and_test_sets():
    study = configs.read_yaml(CONFIGS / "paper_celebahq_pgan.yaml")["study"]
    assert {f"xception_block{i}" for i in range(1, 6)} | {"resnet18_layer1"} <= set(study["models"])
    assert {"celebahq_pgan", "celebahq_sgan", "celebahq_glow", "celeba_gmm"} <= set(study["test_sets"])
    assert configs.read_yaml(CONFIGS / "paper_xception_block2.yaml", "train")["model"] == "xception_block2"


@pytest.mark.parametrize("rule, since_best, done", [("patience", 3, True), ("public", 3, False),
                                                     ("public", 16, True), ("patience", 2, False)])
def test_a_run_counts_as_trained_by_trainings_own_stop_rule(tmp_path, monkeypatch, rule, since_best, done):
    """A killed paper-config run (public rule) between patience and 5 x patience epochs past its best still trains."""
    from patchscope.analysis import study
    from patchscope.forensics.train import TrainConfig

    line = {"epoch": 20, "epochs_since_best": since_best, "best_val_patch_acc": 0.9}
    monkeypatch.setattr(study, "_committed", lambda cell: line)
    config = TrainConfig(model="xception_block2", patience=3, max_epochs=100, early_stopping=rule)
    assert study.trained(study.Cell("xb2", "a", tmp_path, config)) is done
