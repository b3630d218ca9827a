"""One bad-file policy whether images are cached or decoded lazily (issue 21): a truncated JPEG, whose header
passes Pillow's verify and which fails only when decoded, is counted, named in one log line and skipped by
`train --cache`, `train --no-cache` (DataLoader workers), `eval` (lazy), the robustness sweep (cached) and
`patches` alike; `--on-bad-image error` stops each of them with one line and exit code 2."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.cli import main
from patchscope.common.images import BadImageError, image_size, read_image
from patchscope.forensics.data import load_split, make_loader

PER_SPLIT = 5
TRAIN = ("train", "--model", "xception_block1", "--load-size", "32", "--crop-size", "32", "--batch-size", "4",
         "--max-epochs", "1", "--device", "cpu", "--precision", "fp32")
SKIP_LINE = re.compile(r"skipped \d+ of \d+ images that could not be read: .*")


def run(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """real/ and fake/ with train, val and test splits of 40 px JPEGs; real train and test each hold one
    truncated JPEG (02.jpg)."""
    root = tmp_path_factory.mktemp("bad_policy")
    rng = np.random.default_rng(0)
    for kind in ("real", "fake"):
        for split in ("train", "val", "test"):
            folder = root / kind / split
            folder.mkdir(parents=True)
            for i in range(PER_SPLIT):
                noise = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(noise // (2 if kind == "fake" else 1)).save(folder / f"{i:02d}.jpg", quality=90)
    bad = {split: truncate(root / "real" / split / "02.jpg") for split in ("train", "test")}
    return {"root": root, "real": root / "real", "fake": root / "fake", **{f"bad_{s}": p for s, p in bad.items()}}


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "patchscope.data" and r.levelno == logging.WARNING and SKIP_LINE.fullmatch(r.getMessage())]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_the_truncated_jpeg_passes_the_header_check_and_fails_only_when_decoded(folders):
    assert image_size(folders["bad_train"]) == (40, 40)  # what a header probe sees: nothing wrong
    with pytest.raises(BadImageError, match="truncated"):
        read_image(folders["bad_train"])


def test_cached_and_lazy_sets_keep_the_same_images(folders):
    sets = [load_split(folders["real"], folders["fake"], "train", load_size=32, crop_size=32, cache=cache,
                       workers=workers) for cache, workers in ((True, 0), (False, 0), (False, 2))]
    assert [(s.n_real, s.n_fake) for s in sets] == [(PER_SPLIT - 1, PER_SPLIT)] * 3
    assert sets[0].paths == sets[1].paths == sets[2].paths and folders["bad_train"] not in sets[0].paths
    assert [s.real.skipped for s in sets] == [sets[0].real.skipped] * 3


def test_train_with_and_without_the_cache_skips_it_with_the_same_log_line(folders, tmp_path, caplog):
    lines = {}
    for mode in ("--cache", "--no-cache"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = run(*TRAIN, "--real", folders["real"], "--fake", folders["fake"], "--out", tmp_path / mode,
                         mode, "--workers", "0" if mode == "--cache" else "2")
        assert result.exit_code == 0, result.output
        lines[mode] = skip_lines(caplog)
    assert lines["--cache"] == lines["--no-cache"]
    assert len(lines["--cache"]) == 1  # the train split; val has no bad file
    line = lines["--cache"][0]
    assert f"skipped 1 of {PER_SPLIT} images" in line and str(folders["bad_train"]) in line


def test_eval_lazy_and_the_cached_sweep_score_the_same_images_and_log_the_same_line(folders, tmp_path, caplog):
    runs = tmp_path / "run"
    assert run(*TRAIN, "--real", folders["real"], "--fake", folders["fake"], "--out", runs).exit_code == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run("eval", runs, "--test", f"t={folders['real']},{folders['fake']}", "--device", "cpu",
                     "--precision", "fp32", "--perturb", "blur:0", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    lines = skip_lines(caplog)
    # once for eval's lazy set (scores), once for the sweep's cached set (robustness): the same line
    assert len(lines) == 2 and lines[0] == lines[1] and str(folders["bad_test"]) in lines[0]
    scored = 2 * PER_SPLIT - 1
    assert re.search(rf"^t\s.*\s{scored}$", result.output, re.M), result.output  # eval's table: n
    assert re.search(rf"^clean\s.*\s{scored}$", result.output, re.M), result.output  # the sweep's clean row
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run("patches", runs, "--real", folders["real"], "--fake", folders["fake"], "-n", "2",
                     "--device", "cpu", "--precision", "fp32", "--out", tmp_path / "patches")
    assert result.exit_code == 0, result.output
    assert skip_lines(caplog) == lines[:1]


@pytest.mark.parametrize("command", ["train --cache", "train --no-cache", "eval", "patches"])
def test_the_error_policy_stops_every_command_with_one_line(folders, tmp_path, command):
    real, fake, policy = folders["real"], folders["fake"], ("--on-bad-image", "error")
    if command.startswith("train"):
        result = run(*TRAIN, "--real", real, "--fake", fake, "--out", tmp_path / "run", command.split()[1], *policy)
        bad = folders["bad_train"]
    else:
        from patchscope.forensics.checkpoint import save_classifier
        from patchscope.forensics.models import build_model

        save_classifier(tmp_path / "run" / "best", build_model("xception_block1", seed=0),
                        {"config": {"load_size": 32, "crop_size": 32}})
        args = (["--test", f"t={real},{fake}"] if command == "eval" else ["--real", real, "--fake", fake])
        result = run(command, tmp_path / "run", *args, "--device", "cpu", *policy)
        bad = folders["bad_test"]
    line = one_error_line(result)
    assert line.startswith(f"error: {bad}: corrupt or truncated image data")


def test_a_file_that_breaks_after_loading_stops_a_worker_with_one_line_naming_it(folders, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for source in sorted((folders["real"] / "test").iterdir()):
        (real / source.name).write_bytes(source.read_bytes())
    dataset = load_split(real, folders["fake"] / "test", load_size=32, crop_size=32, cache=False)
    broken = truncate(real / "03.jpg")  # read fine when the set was loaded, truncated since
    with pytest.raises(BadImageError) as info:
        for _ in make_loader(dataset, 4, train=False, workers=1):
            pass
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{broken}: corrupt or truncated image data")
    assert "changed since" in message and info.value.path == broken
