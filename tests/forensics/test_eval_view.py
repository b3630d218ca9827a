"""Eval's view when the load size differs from the crop size: `auto` scores a patch classifier on the whole
resized image (the public code's test transform: Resize(load) then CenterCrop(load)) and a whole-image baseline
on the centre crop; `full` and `crop` force either. The same rule in eval, score (still exactly eval's scores),
patches, eval's heatmaps and its robustness sweep."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.analysis import heatmaps as heatmaps_mod
from patchscope.analysis import robustness as robustness_mod
from patchscope.analysis.evaluation import run_eval
from patchscope.analysis.patches import run_patches
from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics import evaluate as evaluate_mod
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig, evaluate, view_crop_size
from patchscope.forensics.models import build_model
from patchscope.forensics.receptive import output_size
from patchscope.forensics.score_images import ScoreConfig, score_images

LOAD, CROP = 40, 32
SHAPES = [(48, 48), (44, 60), (70, 50), (40, 40)]  # (height, width)
CPU = dict(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A patch classifier and a whole-image baseline, both saved as trained at load 40, crop 32; 8 images."""
    root = tmp_path_factory.mktemp("view")
    for name, model in (("patch", "xception_block1"), ("whole", "resnet18")):
        save_classifier(root / name / "best", build_model(model, seed=1, init="kaiming"),
                        {"config": {"load_size": LOAD, "crop_size": CROP}})
    rng = np.random.default_rng(0)
    for kind in ("real", "fake"):
        (root / kind).mkdir()
        for i, shape in enumerate(SHAPES):
            pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            Image.fromarray(pixels // (2 if kind == "fake" else 1)).save(root / kind / f"{i}.png")
    return {"patch": root / "patch", "whole": root / "whole", "real": root / "real", "fake": root / "fake"}


def spy(monkeypatch, module) -> list[tuple[int, int]]:
    """Record (input side, output map side) of every batch `module.predict` scores."""
    seen: list[tuple[int, int]] = []
    real_predict = module.predict

    def predict(model, loader, *args, **kwargs):
        batches = list(loader)
        probs, labels = real_predict(model, batches, *args, **kwargs)
        seen.extend((x.shape[-1], probs.shape[-1]) for x, _, _ in batches)
        return probs, labels

    monkeypatch.setattr(module, "predict", predict)
    return seen


def eval_of(world, which: str, out: Path, **changes) -> dict:
    return evaluate(EvalConfig(run=str(world[which]), tests=[f"t={world['real']},{world['fake']}"], out=str(out),
                               **CPU, **changes))


def scores_csv(out: Path) -> list[list[str]]:
    return list(csv.reader((out / "scores_t.csv").read_text().splitlines()))


def test_the_rule_deciding_the_crop_size():
    patch, whole = build_model("xception_block1"), build_model("resnet18")
    assert view_crop_size("auto", patch, 40, 32) == ("full", 40)
    assert view_crop_size("auto", whole, 40, 32) == ("crop", 32)
    assert view_crop_size("auto", patch, None, 32) == ("crop", 32)  # no resize: images may differ in size
    assert view_crop_size("full", whole, 40, 32) == ("full", 40)
    assert view_crop_size("crop", patch, 40, 32) == ("crop", 32)
    assert view_crop_size("full", patch, 40, None) == ("full", 40)
    assert view_crop_size("crop", patch, 40, None) == ("crop", None)  # the same square: the shorter side's
    with pytest.raises(InputError, match="view='whole'"):
        view_crop_size("whole", patch, 40, 32)
    with pytest.raises(InputError, match="view='whole': expected one of auto, full, crop"):
        EvalConfig(run="r", view="whole")


def test_auto_scores_a_patch_model_on_the_whole_resized_image(world, tmp_path, monkeypatch):
    seen = spy(monkeypatch, evaluate_mod)
    auto = eval_of(world, "patch", tmp_path / "auto")
    model = build_model("xception_block1")
    assert (auto["view"], auto["input_size"], auto["crop_size"]) == ("full", LOAD, CROP)
    assert set(seen) == {(LOAD, output_size(model, LOAD))}
    seen.clear()
    as_crop_40 = eval_of(world, "patch", tmp_path / "crop40", crop_size=LOAD)
    assert scores_csv(tmp_path / "auto") == scores_csv(tmp_path / "crop40")
    assert auto["results"] == as_crop_40["results"]
    full = eval_of(world, "patch", tmp_path / "full", view="full")
    assert scores_csv(tmp_path / "full") == scores_csv(tmp_path / "auto")
    seen.clear()
    crop = eval_of(world, "patch", tmp_path / "crop", view="crop")
    assert (crop["view"], crop["input_size"]) == ("crop", CROP)
    assert set(seen) == {(CROP, output_size(model, CROP))}
    assert scores_csv(tmp_path / "crop") != scores_csv(tmp_path / "auto")
    saved = json.loads((tmp_path / "crop" / "metrics.json").read_text())
    assert saved["view"] == "crop" and full["view"] == "full"


def test_auto_scores_a_whole_image_baseline_on_the_centre_crop(world, tmp_path, monkeypatch):
    seen = spy(monkeypatch, evaluate_mod)
    auto = eval_of(world, "whole", tmp_path / "auto")
    assert (auto["view"], auto["input_size"]) == ("crop", CROP) and set(seen) == {(CROP, 1)}
    eval_of(world, "whole", tmp_path / "crop", view="crop")
    assert scores_csv(tmp_path / "auto") == scores_csv(tmp_path / "crop")
    seen.clear()
    assert eval_of(world, "whole", tmp_path / "full", view="full")["view"] == "full" and set(seen) == {(LOAD, 1)}


@pytest.mark.parametrize("which, view", [("patch", "auto"), ("patch", "full"), ("patch", "crop"),
                                         ("whole", "auto"), ("whole", "full")])
def test_score_gives_exactly_evals_scores_under_each_view(world, tmp_path, which, view):
    runner = CliRunner()
    cpu = ["--device", "cpu", "--precision", "fp32", "--batch-size", "3"]
    result = runner.invoke(main, ["eval", str(world[which]), "--test", f"t={world['real']},{world['fake']}",
                                  "--out", str(tmp_path / "eval"), "--view", view, *cpu])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["score", str(world[which]), str(world["real"]), str(world["fake"]),
                                  "--out", str(tmp_path / "score"), "--view", view, *cpu])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "score" / "scores.csv", newline="") as handle:
        scored = [(row["path"], row["after_softmax"]) for row in csv.DictReader(handle)]
    assert scored == [(row[0], row[2]) for row in scores_csv(tmp_path / "eval")[1:]]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert summary["view"] == metrics["view"] and summary["input_size"] == metrics["input_size"]
    result = score_images(ScoreConfig(run=str(world[which]), inputs=[str(world["real"])], view=view, **CPU))
    expected = LOAD if metrics["view"] == "full" else CROP
    assert tuple(result.dataset[0][0].shape[-2:]) == (expected, expected)


@pytest.mark.parametrize("view, side", [("auto", LOAD), ("full", LOAD), ("crop", CROP)])
def test_patches_follows_the_view(world, tmp_path, view, side):
    summary = run_patches(str(world["patch"]), str(world["real"]), str(world["fake"]), out=str(tmp_path / "p"),
                          n=2, view=view, save_crops=False, **CPU)
    cells = output_size(build_model("xception_block1"), side)
    assert summary["input_size"] == [side, side] and summary["output_size"] == [cells, cells]
    assert summary["view"] == ("full" if view == "auto" else view)


@pytest.mark.parametrize("view, side", [("auto", LOAD), ("crop", CROP)])
def test_eval_heatmaps_and_robustness_sweep_score_the_same_view(world, tmp_path, monkeypatch, view, side):
    heat_seen, sweep_seen = spy(monkeypatch, heatmaps_mod), spy(monkeypatch, robustness_mod)
    summary = run_eval(EvalConfig(run=str(world["patch"]), tests=[f"t={world['real']},{world['fake']}"],
                                  out=str(tmp_path / "e"), view=view, heatmaps=1, perturb=["jpeg:90"], **CPU))
    assert {x for x, _ in heat_seen} == {side} and {x for x, _ in sweep_seen} == {side}
    clean = summary["robustness"]["results"]["t"][0]
    assert clean["ap"] == summary["results"]["t"]["after_softmax"]["ap"]
    saved = json.loads((tmp_path / "e" / "robustness" / "t" / "robustness.json").read_text())
    assert (saved["view"], saved["input_size"]) == (summary["view"], side)
