"""The retrain study: old vs retrained classifier side by side — its files, histograms, table, summary, figure,
resume and refusals — on tiny PGANs and built-in real crops."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchscope.analysis.residual import RetrainStudyConfig, patch_histograms, run_retrain_study, summary_text
from patchscope.common.errors import InputError
from tests.attacks.test_retrain import COUNTS, make_world

N = 8  # top patches per class and classifier: fewer than the 16 test images, so the choice matters
CLASSES = ["flat", "edge", "texture"]



@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("residual_world"))


def study_config(world: dict[str, Path], out: Path, **changes) -> RetrainStudyConfig:
    return RetrainStudyConfig(**{"classifier": str(world["base"]), "generator": str(world["finetuned_generator"]),
                                 "out": str(out), "n": N, "device": "cpu", "precision": "fp32", **changes})


@pytest.fixture(scope="module")
def study(world, tmp_path_factory):
    return run_retrain_study(study_config(world, tmp_path_factory.mktemp("study") / "out"))


def _records(out: Path, who: str) -> dict:
    return json.loads((out / "patches" / who / "patches.json").read_text())


# ----------------------------------------------------------------------------- files and numbers

def test_the_study_writes_every_file(study) -> None:
    out = Path(study["out"])
    for name in ("config.yaml", "comparison.json", "comparison.csv", "comparison.png", "summary.txt",
                 "retrain/metrics.json", "retrain/classifier/best.safetensors", "retrain/fakes/manifest.json",
                 "patches/old/patches.json", "patches/new/patches.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(study["comparison"]))


def test_histograms_count_n_top_patches_and_one_random_patch_per_image_either_classifier_kept(study) -> None:
    out = Path(study["out"])
    histograms = study["comparison"]["patches"]["histograms"]
    for label_id, label in ((1, "fake"), (0, "real")):
        kept = set()
        for who in ("old", "new"):
            records = [r for r in _records(out, who)["top"] if r["label"] == label_id]
            kept |= {r["index"] for r in records}
            h = histograms[label][who]
            assert h["n"] == sum(h["counts"].values()) == N
            assert h["counts"] == {c: sum(r["semantic"] == i for r in records) for i, c in enumerate(CLASSES)}
            assert sum(h["fractions"].values()) == pytest.approx(1.0)
        assert histograms[label]["random"]["n"] == len(kept) <= COUNTS["test"]
        change = histograms[label]["share_change"]
        for c in CLASSES:
            assert change[c] == pytest.approx(histograms[label]["new"]["fractions"][c]
                                              - histograms[label]["old"]["fractions"][c])


def test_the_table_holds_the_retrain_metrics_and_every_histogram(study) -> None:
    out = Path(study["out"])
    comparison = study["comparison"]
    assert comparison["metrics"] == json.loads((out / "retrain" / "metrics.json").read_text())["metrics"]
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    cell = {(r["table"], r["classifier"], r["subset"], r["name"]): float(r["value"]) for r in rows}
    metrics = comparison["metrics"]
    assert cell[("metric", "old", "finetuned", "acc")] == pytest.approx(metrics["old"]["finetuned"]["acc"])
    assert cell[("metric", "new", "original", "ap")] == pytest.approx(metrics["new"]["original"]["ap"])
    for label in ("fake", "real"):
        for who in ("old", "new", "random"):
            h = comparison["patches"]["histograms"][label][who]
            for c in CLASSES:
                assert cell[("patch_count", who, label, c)] == h["counts"][c]
                assert cell[("patch_fraction", who, label, c)] == pytest.approx(h["fractions"][c])


def test_the_summary_answers_with_the_studys_numbers(study) -> None:
    text = (Path(study["out"]) / "summary.txt").read_text()
    m = study["comparison"]["metrics"]
    assert text == study["summary"]
    assert (f"old classifier accuracy on finetuned fakes: {m['old']['finetuned']['acc']:.3f} "
            f"(was {m['old']['original']['acc']:.3f} on original fakes)") in text
    assert f"retrained classifier AP on finetuned fakes: {m['new']['finetuned']['ap']:.3f}" in text
    fake = study["comparison"]["patches"]["histograms"]["fake"]
    row = next(line for line in text.splitlines() if line.strip().startswith("texture"))  # the fake table comes first
    assert row.split()[1:] == [f"{fake[w]['fractions']['texture']:.3f}" for w in ("old", "new", "random")]


def test_the_figure_is_a_png_with_drawn_content(study) -> None:
    path = Path(study["out"]) / "comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[1] > 800 and pixels.shape[0] > 500
    # The bar colours of both classifiers and the random baseline are all drawn.
    for colour in ((31, 119, 180), (255, 127, 14), (127, 127, 127)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=2) < 10).sum() > 50, colour


# ----------------------------------------------------------------------------- the parts, exactly

def test_random_baseline_pools_both_classifiers_images_once_each() -> None:
    def rec(index, label, semantic):
        return {"index": index, "label": label, "semantic": semantic}

    patches = {"old": {"top": [rec(3, 1, 0), rec(4, 1, 2), rec(0, 0, 1)],
                       "random": [rec(3, 1, 1), rec(4, 1, 1), rec(0, 0, 0)]},
               "new": {"top": [rec(4, 1, 2), rec(5, 1, 2), rec(1, 0, 0)],
                       "random": [rec(4, 1, 1), rec(5, 1, 2), rec(1, 0, 0)]}}
    h = patch_histograms(patches, CLASSES)
    assert h["fake"]["old"]["counts"] == {"flat": 1, "edge": 0, "texture": 1}
    assert h["fake"]["new"]["counts"] == {"flat": 0, "edge": 0, "texture": 2}
    assert h["fake"]["random"]["counts"] == {"flat": 0, "edge": 2, "texture": 1}  # images 3, 4, 5
    assert h["fake"]["share_change"] == pytest.approx({"flat": -0.5, "edge": 0.0, "texture": 0.5})
    assert h["real"]["random"]["n"] == 2 and h["real"]["new"]["fractions"]["flat"] == 1.0


def test_summary_lists_gaining_and_losing_classes_by_size_of_change() -> None:
    metrics = {who: {name: {"ap": 0.9, "acc": 0.8, "acc_fake": 0.7, "acc_real": 0.9, "n": 10}
                     for name in ("original", "finetuned")} for who in ("old", "new")}
    hist = {"n": 4, "fractions": {"flat": 0.25, "edge": 0.25, "texture": 0.5}}
    per = {"old": hist, "new": hist, "random": hist,
           "share_change": {"flat": 0.125, "edge": -0.375, "texture": 0.25}}
    text = summary_text({"aggregation": "after_softmax", "metrics": metrics,
                         "patches": {"segmenter": "low-level", "classes": CLASSES,
                                     "histograms": {"fake": per, "real": per}}})
    assert "  patch classes gaining share (retrained vs old): texture +0.250, flat +0.125" in text.splitlines()
    assert "  patch classes losing share: edge -0.375" in text.splitlines()


# ----------------------------------------------------------------------------- resume and refusals

def test_rerunning_is_refused_without_resume_and_resume_reuses_every_stage(world, study) -> None:
    config = study_config(world, Path(study["out"]))
    with pytest.raises(InputError, match=r"already holds a retrain study; pass --resume"):
        run_retrain_study(config)
    again = run_retrain_study(config, resume=True)
    assert set(again["stages"].values()) == {"reused"}
    assert again["comparison"] == study["comparison"]
    with pytest.raises(InputError, match=r"cannot resume with different n"):
        run_retrain_study(study_config(world, Path(study["out"]), n=4), resume=True)


def test_a_missing_face_parser_fails_before_any_work(world, tmp_path) -> None:
    with pytest.raises(InputError, match=r"nope\.pth: face-parsing weights not found"):
        run_retrain_study(study_config(world, tmp_path / "out", face_parser=str(tmp_path / "nope.pth")))
    assert not (tmp_path / "out").exists()


def test_a_missing_base_run_leaves_no_claim_on_the_folder(world, tmp_path) -> None:
    with pytest.raises(InputError, match=r"no classifier checkpoint here"):
        run_retrain_study(study_config(world, tmp_path / "out", classifier=str(tmp_path / "no_run")))
    assert not (tmp_path / "out" / "config.yaml").exists()
