"""`patchscope score`: unlabelled images get exactly the scores eval gives them as part of a test set
(load size != crop size, mixed image sizes, batch sizes that do not divide the count), bad files are
skipped and named once, outputs are written where asked and user errors are one line with exit code 2."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.models import build_model
from patchscope.forensics.score_images import ScoreConfig, list_inputs

AGGREGATIONS = ("after_softmax", "before_softmax", "vote")
SHAPES = [(40, 40), (44, 70), (81, 45), (52, 52), (60, 90)]  # (height, width): square, landscape, portrait
CPU = ("--device", "cpu", "--precision", "fp32")
ODD_NAME = os.fsdecode(b"odd_\xff.png")  # a file name that is not UTF-8


def run(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A random-weight classifier saved as a run trained with load size 40 and crop size 32."""
    run_dir = tmp_path_factory.mktemp("score") / "run"
    save_classifier(run_dir / "best", build_model("xception_block1", seed=3),
                    {"config": {"load_size": 40, "crop_size": 32}})
    return run_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """7 real and 6 fake images of five sizes; one real file name is not UTF-8."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for kind, count in (("real", 7), ("fake", 6)):
        (root / kind).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (*SHAPES[i % len(SHAPES)], 3), dtype=np.uint8)
            name = ODD_NAME if (kind, i) == ("real", 4) else f"{i:02d}.png"
            Image.fromarray(pixels // (3 if kind == "fake" else 1)).save(root / kind / name)
    return {"real": root / "real", "fake": root / "fake"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def eval_scores(classifier, folders, tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """(path, score) rows of eval's scores CSV, per aggregation (batch size 5 for 13 images)."""
    found = {}
    for mode in AGGREGATIONS:
        out = tmp_path_factory.mktemp(f"eval_{mode}")
        result = run("eval", classifier, "--test", f"t={folders['real']},{folders['fake']}", "--out", out,
                     "--aggregation", mode, "--batch-size", "5", *CPU)
        assert result.exit_code == 0, result.output
        found[mode] = [(row["path"], row["score"]) for row in read_rows(out / "scores_t.csv")]
    return found


@pytest.mark.parametrize("batch_size", [4, 13, 64])
def test_score_of_a_folder_gives_exactly_evals_scores(classifier, folders, eval_scores, tmp_path, batch_size):
    out = tmp_path / "scores"
    result = run("score", classifier, folders["real"], folders["fake"], "--out", out, "--batch-size", batch_size,
                 *CPU)
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "scores.csv")
    assert len(rows) == 13
    for mode in AGGREGATIONS:
        assert [(row["path"], row[mode]) for row in rows] == eval_scores[mode]
    assert any("\\xff" in row["path"] for row in rows)  # escaped as eval escapes it
    summary = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert summary["n"] == 13 and summary["n_skipped"] == 0
    assert (summary["load_size"], summary["crop_size"]) == (40, 32)
    assert [image["path"] for image in summary["images"]] == [row["path"] for row in rows]
    for mode in AGGREGATIONS:
        values = [image[mode] for image in summary["images"]]
        assert [f"{v:.6f}" for v in values] == [row[mode] for row in rows]
        assert summary["mean"][mode] == pytest.approx(np.mean(values), abs=1e-6)
    # The printed table: the first ten rows, the rest counted, the mean and the count.
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", *AGGREGATIONS]
    assert "... 3 more" in result.stdout and "13 images scored" in result.stdout
    mean_line = next(line for line in lines if line.startswith("mean"))
    assert float(mean_line.split()[1]) == pytest.approx(summary["mean"]["after_softmax"], abs=1e-4)


def test_files_manifests_and_bad_files(classifier, folders, eval_scores, tmp_path, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{folders['fake'] / '01.png'}\n{folders['fake'] / '02.png'}\n")
    csv_path, json_path = tmp_path / "a" / "s.csv", tmp_path / "b" / "s.json"
    with caplog.at_level(logging.WARNING):
        result = run("score", classifier, folders["real"] / "00.png", bad, manifest, folders["real"] / "00.png",
                     "--csv", csv_path, "--json", json_path, "--batch-size", "2", *CPU)
    assert result.exit_code == 0, result.output
    rows = read_rows(csv_path)
    assert [Path(row["path"]).name for row in rows] == ["00.png", "01.png", "02.png"]  # each file once
    expected = dict(eval_scores["after_softmax"])
    assert [row["after_softmax"] for row in rows] == [expected[row["path"]] for row in rows]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 of 4" in warnings[0] and str(bad) in warnings[0]
    summary = json.loads(json_path.read_text())
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["path"] == str(bad)
    assert "(1 unreadable skipped)" in result.stdout
    assert not (tmp_path / "a" / "scores.json").exists()

    result = run("score", classifier, folders["real"] / "00.png", bad, "--on-bad-image", "error", *CPU)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and str(bad) in result.stderr


def test_heatmap_cards_for_every_image(classifier, folders, tmp_path):
    heatmaps = tmp_path / "heat"
    result = run("score", classifier, folders["fake"], "--heatmaps", heatmaps, *CPU)
    assert result.exit_code == 0, result.output
    cards = sorted(p.name for p in heatmaps.glob("*.png"))
    assert cards == [f"{i:05d}_{i:02d}.png" for i in range(6)]
    assert (heatmaps / "heatmaps.html").is_file() and f"heatmaps: {heatmaps / 'heatmaps.html'}" in result.stdout
    index = json.loads((heatmaps / "heatmaps.json").read_text())
    assert [card["card"] for card in index["cards"]] == cards
    again = run("score", classifier, folders["fake"], "--heatmaps", heatmaps, *CPU)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert run("score", classifier, folders["fake"], "--heatmaps", heatmaps, "--force", *CPU).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such file or folder"),
    (["{empty}"], "no images found"),
    ([], "no images given"),
    (["{real}", "--out", "{existing}"], "exists; pass --force"),
    (["{real}", "--csv", "{folder}"], "is a folder"),
    (["{real}", "--csv", "{same}", "--json", "{same}"], "name the same file"),
])
def test_user_errors_are_one_line_with_exit_code_2(classifier, folders, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "scores.csv").write_text("path\n")
    names = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "real": folders["real"],
             "existing": tmp_path / "existing", "folder": tmp_path / "empty", "same": tmp_path / "s.txt"}
    result = run("score", classifier, *[arg.format(**names) for arg in args], *CPU)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_images_smaller_than_the_crop_name_the_option(classifier, tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    result = run("score", classifier, tmp_path / "a.png", "--load-size", "24", "--view", "crop", *CPU)
    assert result.exit_code == 2 and "--load-size" in result.stderr
    # the default view scores a patch classifier's whole resized image, never the crop: 24 px are enough
    result = run("score", classifier, tmp_path / "a.png", "--load-size", "24", *CPU)
    assert result.exit_code == 0, result.output


def test_split_folders_and_the_settings(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / "x.png")
    assert list_inputs([str(tmp_path)]) == [tmp_path / "test" / "x.png", tmp_path / "train" / "x.png"]
    assert list_inputs([str(tmp_path)], "test") == [tmp_path / "test" / "x.png"]
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputError, match="not a folder or a manifest"):
        list_inputs([str(tmp_path / "notes.md")])
    assert ScoreConfig(inputs="a").inputs == ["a"]
    with pytest.raises(InputError, match="setting batch_size=0"):
        ScoreConfig(batch_size=0)


def test_help_shows_an_example():
    result = run("score", "--help")
    assert result.exit_code == 0 and "Example:" in result.output and "patchscope score runs/" in result.output
