"""Robustness sweeps: one row per level, the clean row matches `patchscope eval`, blur hides resampling traces."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from patchscope.analysis.robustness import COLUMNS, evaluate_robustness, evaluate_robustness_tests, format_robustness_table
from patchscope.common.errors import InputError
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.perturb import Perturbation
from patchscope.forensics.train import TrainConfig, fit

METRICS = ("ap", "ap_real", "acc", "acc_real", "acc_fake")


@pytest.fixture(scope="module")
def trained_run(builtin_dataset, tmp_path_factory):
    """A tiny classifier that finds the built-in fakes' 2x2 nearest-neighbour blocks (AP ~0.9 clean)."""
    run = tmp_path_factory.mktemp("robust") / "run"
    fit(TrainConfig(real=str(builtin_dataset / "real"), fake=str(builtin_dataset / "fake"), out=str(run),
                    model="xception_block1", load_size=32, crop_size=32, batch_size=16, max_epochs=8,
                    patience=20, device="cpu", seed=0, init="kaiming"))
    return run


@pytest.fixture(scope="module")
def sweep(trained_run, builtin_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    rows = evaluate_robustness(EvalConfig(run=str(trained_run), device="cpu", batch_size=32), builtin_dataset / "real",
                               builtin_dataset / "fake", ["jpeg:90,50", "blur:0,2"], out)
    return rows, out


def test_one_row_per_level_with_the_clean_row_first_and_finite_metrics(sweep):
    rows, _ = sweep
    assert [(row["perturbation"], row["level"]) for row in rows] == [
        ("none", None), ("jpeg", 90), ("jpeg", 50), ("blur", 0), ("blur", 2)]
    for row in rows:
        assert list(row) == COLUMNS and row["n"] == 96
        assert all(math.isfinite(row[key]) and 0 <= row[key] <= 1 for key in METRICS)


def test_results_are_written_as_csv_json_and_a_plot(sweep):
    rows, out = sweep
    with open(out / "robustness.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["perturbation"], r["level"]) for r in table] == [
        ("none", ""), ("jpeg", "90"), ("jpeg", "50"), ("blur", "0"), ("blur", "2")]
    assert [float(r["ap"]) for r in table] == [row["ap"] for row in rows]
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["rows"] == rows and saved["model"] == "xception_block1" and saved["crop_size"] == 32
    assert saved["rows"][1]["level"] == 90 and isinstance(saved["rows"][1]["level"], int)  # a quality, not 90.0
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert format_robustness_table(rows).splitlines()[1].startswith("clean ")


def test_the_clean_row_matches_patchscope_eval(sweep, trained_run, builtin_dataset, tmp_path):
    rows, _ = sweep
    result = evaluate(EvalConfig(run=str(trained_run), tests=[f"t={builtin_dataset / 'real'},"
                                                              f"{builtin_dataset / 'fake'}"],
                                 out=str(tmp_path), device="cpu"))
    metrics = result["results"]["t"]["after_softmax"]
    assert {key: rows[0][key] for key in METRICS} == pytest.approx({key: metrics[key] for key in METRICS}, abs=1e-12)


def test_blur_sigma_0_scores_exactly_like_the_clean_set(sweep):
    rows, _ = sweep
    assert {key: rows[3][key] for key in METRICS} == {key: rows[0][key] for key in METRICS}


def test_a_level_matches_evaluating_images_perturbed_on_disk(sweep, trained_run, builtin_dataset, tmp_path):
    rows, _ = sweep
    perturbation = Perturbation("jpeg", 50)
    for kind in ("real", "fake"):
        folder = tmp_path / kind
        folder.mkdir()
        for path in sorted((builtin_dataset / kind / "test").glob("*.png")):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            Image.fromarray(perturbation(pixels)).save(folder / path.name)
    result = evaluate(EvalConfig(run=str(trained_run), tests=[f"j={tmp_path / 'real'},{tmp_path / 'fake'}"],
                                 out=str(tmp_path / "eval"), device="cpu"))
    metrics = result["results"]["j"]["after_softmax"]
    assert {key: rows[2][key] for key in METRICS} == pytest.approx({key: metrics[key] for key in METRICS}, abs=1e-12)


def test_strong_blur_erases_the_resampling_traces_the_classifier_relies_on(sweep):
    rows, _ = sweep
    clean, blurred = rows[0], rows[4]
    assert clean["ap"] > 0.85
    assert blurred["ap"] < clean["ap"] - 0.2


def test_an_existing_sweep_is_refused_without_force(sweep, trained_run, builtin_dataset):
    _, out = sweep
    with pytest.raises(InputError, match="robustness.json exists; pass --force"):
        evaluate_robustness(EvalConfig(run=str(trained_run), device="cpu"), builtin_dataset / "real",
                            builtin_dataset / "fake", ["blur:1"], out)


@pytest.mark.parametrize("perturbations, message", [
    ([], "no perturbation given"),
    (["jpeg:200"], "level '200': JPEG quality must be an integer from 1 to 100"),
    (["blur:1", Perturbation("blur", 1)], "blur:1 given more than once"),
])
def test_bad_perturbation_lists_are_refused_before_any_work(perturbations, message, tmp_path):
    with pytest.raises(InputError, match=message):
        evaluate_robustness(EvalConfig(run=str(tmp_path / "no-run")), tmp_path, tmp_path, perturbations,
                            tmp_path / "out")


def test_every_test_set_of_an_eval_config_gets_its_own_sweep(trained_run, builtin_dataset, tmp_path):
    sources = f"{builtin_dataset / 'real'},{builtin_dataset / 'fake'}"
    config = EvalConfig(run=str(trained_run), tests=[f"a={sources}", f"b={sources}"], out=str(tmp_path),
                        device="cpu")
    result = evaluate_robustness_tests(config, ["jpeg:75"])
    assert sorted(result["results"]) == ["a", "b"]
    assert result["results"]["a"] == result["results"]["b"]
    for name in ("a", "b"):
        assert (tmp_path / "robustness" / name / "robustness.csv").is_file()
