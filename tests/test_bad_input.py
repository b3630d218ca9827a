"""Hostile and awkward input through the real commands (issue 22, items 4-7): every reader decodes an
EXIF-rotated JPEG upright, a symlink loop lists each image once, a FIFO never blocks, `../` names
never write outside --out, and a folder of only unreadable files is a one-line error with exit 2."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.analysis.spectra import average_spectrum, compare_spectra
from patchscope.attacks.invert import read_square
from patchscope.cli import main
from patchscope.common.images import read_image
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.data import ImageSet, list_images, resize_image
from patchscope.forensics.models import build_model
from patchscope.generators.prepare import collect_images, prepare_reals, preprocess
from patchscope.generators.training.images import TrainingImages, list_training_images
from tests.common.test_images import finishes_within
from tests.tiny_models import save_tiny_pgan


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


def noise_images(folder: Path, count: int, size: int = 32, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i:02d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A random-weight classifier run folder trained (nominally) at 32 px."""
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    save_classifier(run_dir / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    return run_dir


# ----------------------------------------------------------------------------- #5 EXIF orientation

def test_an_exif_rotated_jpeg_is_upright_in_every_reader(tmp_path):
    # A portrait 16 x 24 picture (horizontal 1-px stripes, coloured blocks), stored the way a phone
    # stores it: turned a quarter anticlockwise, with EXIF orientation 6 saying how to turn it back.
    rows = np.where(np.arange(24) % 2, 40, -40)[:, None, None]
    blocks = np.kron(np.arange(6).reshape(3, 2), np.ones((8, 8)))[..., None] * np.array([30, 10, 20])
    upright = np.clip(100 + rows + blocks, 0, 255).astype(np.uint8)
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, k=1)).save(folder / "portrait.jpg", quality=100, subsampling=0,
                                                 exif=exif.tobytes())
    path = folder / "portrait.jpg"
    decoded = read_image(path)
    assert decoded.shape == (24, 16, 3) and np.abs(decoded.astype(int) - upright).max() <= 12

    for cache in (True, False):  # train's cached loader, and eval's cache-free one
        images = ImageSet(list_images(folder), cache=cache)
        assert images.sizes == [(24, 16)]
        np.testing.assert_array_equal(images[0], decoded)
    prepared = prepare_reals([folder], tmp_path / "prepared", resolution=16, progress=False, workers=1)
    assert prepared["splits"]["."]["written"] == 1
    with Image.open(tmp_path / "prepared" / "portrait.png") as png:
        np.testing.assert_array_equal(np.asarray(png), np.asarray(preprocess(Image.fromarray(decoded), 16)))
    np.testing.assert_array_equal(TrainingImages(folder, 16).full[0], decoded[4:20])  # centre square
    np.testing.assert_allclose(average_spectrum(folder, split=None), average_spectrum([decoded]))
    square = ((read_square(path, 16) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(square, resize_image(decoded, 16)[4:20])


# ----------------------------------------------------------------------------- #6 symlink loops

@pytest.fixture()
def looped_folders(tmp_path) -> dict[str, Path]:
    """real/ and fake/ with 3 images each, and a link in each pointing back at its own folder."""
    folders = {}
    for seed, kind in enumerate(("real", "fake")):
        folder = tmp_path / kind
        noise_images(folder / "sub", 3, seed=seed)
        (folder / "sub" / "again").symlink_to(folder)
        folders[kind] = folder
    return folders


def test_a_symlink_loop_lists_each_image_once_for_every_command(looped_folders):
    folder = looped_folders["real"]
    expected = sorted((folder / "sub").glob("*.png"))
    assert list_images(folder) == expected                   # train, eval, patches, spectra, invert, retrain
    assert [image.source for image in collect_images([folder])] == expected  # prepare
    assert list_training_images(folder) == expected          # train-gan


def test_a_symlink_loop_does_not_duplicate_prepared_or_scored_images(looped_folders, classifier_run, tmp_path):
    result = run("prepare", looped_folders["real"], "--out", tmp_path / "prepared", "--resolution", "16")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "prepared").rglob("*.png"))) == 3
    result = run("eval", classifier_run, "--test", f"loop={looped_folders['real']},{looped_folders['fake']}",
                 "--out", tmp_path / "eval", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "eval" / "scores_loop.csv") as table:
        assert len(list(csv.DictReader(table))) == 6
    summary = compare_spectra(looped_folders["real"], looped_folders["fake"], tmp_path / "spectra", split=None)
    assert summary["n_real"] == summary["n_fake"] == 3


# ----------------------------------------------------------------------------- FIFOs

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_png_is_skipped_as_unreadable_not_waited_on(tmp_path):
    folder = tmp_path / "images"
    noise_images(folder, 2, size=16)
    fifo = folder / "x.png"
    os.mkfifo(fifo)
    # prepare decodes in worker threads: run the command in its own process, so a hang is a timeout.
    command = [sys.executable, "-c", "from patchscope.cli import main; main()",
               "prepare", str(folder), "--out", str(tmp_path / "prepared"), "--resolution", "16"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("prepare blocked on a FIFO named x.png")
    assert done.returncode == 0, done.stderr
    assert "x.png (not a regular file: a FIFO (named pipe))" in done.stderr
    assert sorted(p.name for p in (tmp_path / "prepared").glob("*.png")) == ["00.png", "01.png"]
    images = finishes_within(30, lambda: TrainingImages(folder, 16), fifo)  # train-gan
    assert len(images) == 2 and images.skipped == [fifo]
    for cache in (True, False):  # train, eval
        image_set = finishes_within(30, lambda: ImageSet(list_images(folder), cache=cache), fifo)
        assert len(image_set) == 2 and image_set.skipped == [(fifo, "not a regular file: a FIFO (named pipe)")]


# ----------------------------------------------------------------------------- #4 names outside --out

def test_an_invert_manifest_line_with_dotdot_is_written_inside_out(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    noise_images(images, 1, size=16)                      # images/00.png
    noise_images(tmp_path, 1, size=16, seed=3)[0].rename(tmp_path / "X.png")
    (images / "list.txt").write_text("00.png\nsub/../../X.png\n")
    generator = save_tiny_pgan(tmp_path / "pgan.pt", seed=0)
    runs = tmp_path / "runs"
    result = run("invert", "--generator", generator, "--images", images / "list.txt", "--out", runs / "out",
                 "--steps", "1", "--lambda-lpips", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert files_under(runs) <= files_under(runs / "out")  # nothing beside or above --out
    assert {"00.png", "X.png"} <= {p.name for p in (runs / "out").iterdir()}


@pytest.mark.parametrize("name", ["../../../../X", "sub/../../X", "ABSOLUTE"])
def test_an_eval_test_name_that_leaves_out_is_refused(classifier_run, tmp_path, name):
    name = str(tmp_path / "elsewhere" / "X") if name == "ABSOLUTE" else name
    real, fake = noise_images(tmp_path / "real", 2), noise_images(tmp_path / "fake", 2, seed=5)
    out = tmp_path / "a" / "b" / "c" / "out"
    before = files_under(tmp_path)
    result = run("eval", classifier_run, "--test", f"{name}={real[0].parent},{fake[0].parent}", "--out", out,
                 "--heatmaps", "1", "--perturb", "jpeg:90", "--device", "cpu")
    line = one_error_line(result)
    assert name in line and "must stay inside the output folder" in line
    assert files_under(tmp_path) == before  # refused before anything is scored or written


def test_prepare_names_from_a_list_with_dotdot_stay_inside_out(tmp_path):
    noise_images(tmp_path / "elsewhere", 1, size=16)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text("../elsewhere/00.png\n")
    before = files_under(tmp_path)
    result = run("prepare", tmp_path / "lists" / "list.txt", "--out", tmp_path / "prepared", "--resolution", "16")
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) - before == files_under(tmp_path / "prepared")
    assert (tmp_path / "prepared" / "00.png").is_file()


# ----------------------------------------------------------------------------- #7 only unreadable files

def test_prepare_on_a_folder_of_only_unreadable_files_fails_with_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "c.png").write_bytes(b"")
    line = one_error_line(run("prepare", folder, "--out", tmp_path / "prepared", "--resolution", "16"))
    assert str(folder) in line and "3 unreadable" in line and "a.png" in line
    assert not list((tmp_path / "prepared").rglob("*.png"))
