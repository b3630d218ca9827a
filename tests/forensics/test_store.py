"""The prepared image store (`forensics.store`): images read back from it equal the decoded and resized ones bit
for bit, training and eval through it give the same numbers, it is decoded into once and reused while nothing
changes, a changed file or load size is decoded again, an interrupted build is never trusted, and bad files are
skipped with the same warning line."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchscope.common.images import BadImageError, read_image
from patchscope.forensics import data, store
from patchscope.forensics.data import ImageSet, resize_image
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.train import TrainConfig, fit

SKIP_LINE = re.compile(r"skipped \d+ of \d+ images that could not be read: .*")


def write_images(folder: Path) -> list[Path]:
    """Mixed sizes and aspect ratios, RGB/greyscale/RGBA/16-bit/palette PNGs, a JPEG; then two bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    images = {
        "wide.png": Image.fromarray(rgb(40, 90)),
        "tall.png": Image.fromarray(rgb(77, 35)),
        "square.png": Image.fromarray(rgb(32, 32)),  # already at the load size: kept as it is
        "grey.png": Image.fromarray(rng.integers(0, 256, (45, 50), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (50, 41, 4), dtype=np.uint8), "RGBA"),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (36, 60), dtype=np.uint16)),
        "palette.png": Image.fromarray(rgb(48, 48)).convert("P"),
        "photo.jpg": Image.fromarray(rgb(64, 48)),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    (folder / "text.png").write_text("not an image")
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # passes a header check, fails when decoded
    return paths + [folder / "text.png", folder / "cut.jpg"]


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Every file ImageSet decodes (in-process: workers=0)."""
    seen: list[Path] = []

    def counting(path):
        seen.append(Path(path))
        return read_image(path)

    monkeypatch.setattr(data, "read_image", counting)
    return seen


def segments(root: Path) -> list[Path]:
    return sorted(root.glob("*/seg-*"))


@pytest.mark.parametrize("load_size", [32, 47, None])
def test_stored_images_equal_the_decoded_and_resized_ones_bit_for_bit(tmp_path, load_size):
    paths = write_images(tmp_path / "images")
    plain = ImageSet(paths, load_size=load_size, cache=True)
    for cache in (True, False):  # built, then read back (cached or lazy: both read the store's maps)
        stored = ImageSet(paths, load_size=load_size, cache=cache, store=tmp_path / "store", workers=2)
        assert stored.paths == plain.paths and stored.sizes == plain.sizes and stored.skipped == plain.skipped
        for i, path in enumerate(stored.paths):
            expected = resize_image(read_image(path), load_size)
            assert stored[i].dtype == np.uint8 and np.array_equal(stored[i], expected), path
            assert not stored[i].flags.writeable
    assert len(segments(tmp_path / "store")) == 1


def test_a_lazy_set_with_a_store_decodes_each_image_once_and_reuses_it(tmp_path, decodes):
    paths = write_images(tmp_path / "images")
    first = ImageSet(paths, load_size=32, cache=False, store=tmp_path / "store")
    [first[i] for i in range(len(first))]
    assert sorted(decodes) == sorted(paths)  # bad files too: their skip is recorded
    decodes.clear()
    again = ImageSet(paths, load_size=32, cache=False, store=tmp_path / "store")
    [again[i] for i in range(len(again))]
    assert decodes == [] and again.skipped == first.skipped


def test_a_changed_file_is_decoded_again_and_only_it(tmp_path, decodes):
    paths = write_images(tmp_path / "images")
    ImageSet(paths, load_size=32, store=tmp_path / "store")
    decodes.clear()
    changed = paths[0]
    Image.fromarray(np.zeros((40, 90, 3), np.uint8)).save(changed)  # new content and mtime
    images = ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert decodes == [changed]
    assert np.array_equal(images[0], np.zeros((32, 72, 3), np.uint8))
    decodes.clear()
    # Same size and mtime, other content (a BMP of the same shape): the digest sees it.
    bmp = tmp_path / "images" / "same.bmp"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(bmp)
    ImageSet([*paths, bmp], load_size=32, store=tmp_path / "store")
    info = os.stat(bmp)
    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(bmp)
    os.utime(bmp, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert os.stat(bmp).st_size == info.st_size
    decodes.clear()
    images = ImageSet([*paths, bmp], load_size=32, store=tmp_path / "store")
    assert decodes == [bmp] and np.array_equal(images[-1], np.full((32, 32, 3), 9, np.uint8))


def test_a_changed_load_size_decodes_everything_into_its_own_folder(tmp_path, decodes):
    paths = write_images(tmp_path / "images")
    ImageSet(paths, load_size=32, store=tmp_path / "store")
    decodes.clear()
    images = ImageSet(paths, load_size=40, store=tmp_path / "store")
    assert sorted(decodes) == sorted(paths)
    assert all(min(size) == 40 for size in images.sizes)
    assert len(list((tmp_path / "store").iterdir())) == 2


def test_an_exception_while_writing_leaves_nothing_trusted_and_the_next_run_rebuilds(tmp_path, monkeypatch,
                                                                                     decodes):
    paths = write_images(tmp_path / "images")
    original_add, calls = store.SegmentWriter.add, []

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("interrupted while writing")
        return original_add(self, *args)

    monkeypatch.setattr(store.SegmentWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert segments(tmp_path / "store") == [] and list((tmp_path / "store").glob("*/.seg-*")) == []
    monkeypatch.setattr(store.SegmentWriter, "add", original_add)
    decodes.clear()
    images = ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert sorted(decodes) == sorted(paths)
    assert all(np.array_equal(images[i], resize_image(read_image(p), 32)) for i, p in enumerate(images.paths))


def test_a_build_killed_before_its_commit_is_never_read(tmp_path, decodes):
    """A subprocess building the store is killed (SIGKILL) right before the rename that commits its segment:
    the segment's files are complete on disk, but under the hidden temporary name no lookup reads."""
    paths = write_images(tmp_path / "images")
    script = textwrap.dedent(f"""
        import os, signal
        from patchscope.forensics import data, store
        def killed(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        store.os.replace = killed
        data.ImageSet({[str(p) for p in paths]!r}, load_size=32, store={str(tmp_path / 'store')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert segments(tmp_path / "store") == [] and len(list((tmp_path / "store").glob("*/.seg-*.tmp"))) == 1
    images = ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert sorted(decodes) == sorted(paths) and len(segments(tmp_path / "store")) == 1
    assert all(np.array_equal(images[i], resize_image(read_image(p), 32)) for i, p in enumerate(images.paths))


def test_a_long_build_commits_as_it_goes_and_an_interruption_keeps_what_was_committed(tmp_path, monkeypatch,
                                                                                        decodes):
    paths = write_images(tmp_path / "images")[:8]  # the good ones
    monkeypatch.setattr(store, "SEGMENT_BYTES", 3 * 32 * 32 * 3)  # a segment every few images
    original_add, calls = store.SegmentWriter.add, []

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("disk full")
        return original_add(self, *args)

    monkeypatch.setattr(store.SegmentWriter, "add", failing_add)
    with pytest.raises(RuntimeError):
        ImageSet(paths, load_size=32, store=tmp_path / "store")
    kept = len(segments(tmp_path / "store"))
    assert kept >= 1
    monkeypatch.setattr(store.SegmentWriter, "add", original_add)
    decodes.clear()
    images = ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert 0 < len(decodes) < len(paths)  # only what the committed segments lack
    assert all(np.array_equal(images[i], resize_image(read_image(p), 32)) for i, p in enumerate(images.paths))


def test_a_damaged_segment_is_ignored_with_a_warning_and_rebuilt(tmp_path, decodes, caplog):
    paths = write_images(tmp_path / "images")
    ImageSet(paths, load_size=32, store=tmp_path / "store")
    [segment] = segments(tmp_path / "store")
    pixels = segment / store.PIXELS
    pixels.write_bytes(pixels.read_bytes()[:100])
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger="patchscope.data"):
        images = ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert sorted(decodes) == sorted(paths)
    assert any("ignoring segment" in r.getMessage() for r in caplog.records)
    assert all(np.array_equal(images[i], resize_image(read_image(p), 32)) for i, p in enumerate(images.paths))


def test_bad_files_are_skipped_with_the_same_warning_line_with_and_without_the_store(tmp_path, caplog, decodes):
    paths = write_images(tmp_path / "images")
    lines = []
    for where in (None, tmp_path / "store", tmp_path / "store"):  # without, building, reading back
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="patchscope.data"):
            ImageSet(paths, load_size=32, store=where)
        lines.append([r.getMessage() for r in caplog.records if SKIP_LINE.fullmatch(r.getMessage())])
    assert len(lines[0]) == 1 and "text.png" in lines[0][0] and "cut.jpg" in lines[0][0]
    assert lines[1] == lines[0] and lines[2] == lines[0]
    with pytest.raises(BadImageError, match="text.png"):
        ImageSet(paths, load_size=32, store=tmp_path / "strict", on_bad_image="error")
    assert segments(tmp_path / "strict") == []


def test_a_stored_set_pickles_without_its_pixels(tmp_path):
    paths = write_images(tmp_path / "images")[:8]
    images = ImageSet(paths, load_size=64, cache=False, store=tmp_path / "store")
    [images[i] for i in range(len(images))]  # maps opened
    copy = pickle.loads(pickle.dumps(images))
    assert len(pickle.dumps(images)) < 4096
    assert all(np.array_equal(copy[i], images[i]) for i in range(len(images)))


def test_a_store_setting_that_is_not_a_path_is_refused(tmp_path):
    with pytest.raises(data.InputError, match="store"):
        ImageSet(write_images(tmp_path / "images")[:1], load_size=32, store=5)


def _train(dataset: Path, out: Path, **overrides) -> list[dict]:
    settings = dict(real=str(dataset / "real"), fake=str(dataset / "fake"), out=str(out), model="xception_block1",
                    load_size=32, crop_size=32, batch_size=16, max_epochs=2, device="cpu", seed=0,
                    precision="fp32")
    fit(TrainConfig(**{**settings, **overrides}))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "time") and not k.endswith("_s")} for line in lines]


def test_training_and_eval_through_the_store_give_the_same_numbers(builtin_dataset, tmp_path):
    plain = _train(builtin_dataset, tmp_path / "plain")
    built = _train(builtin_dataset, tmp_path / "built", store=str(tmp_path / "store"))
    lazy = _train(builtin_dataset, tmp_path / "lazy", store=str(tmp_path / "store"), cache=False, workers=2)
    assert plain == built == lazy
    weights = {run: (tmp_path / run / "last.safetensors").read_bytes() for run in ("plain", "built", "lazy")}
    assert weights["plain"] == weights["built"] == weights["lazy"]
    test = f"t={builtin_dataset / 'real'},{builtin_dataset / 'fake'}"
    results = [evaluate(EvalConfig(run=str(tmp_path / "plain"), tests=[test], device="cpu", precision="fp32",
                                   out=str(tmp_path / f"eval{i}"), store=where))["results"]
               for i, where in enumerate((None, str(tmp_path / "store")))]
    assert results[0] == results[1]
    scores = [(tmp_path / f"eval{i}" / "scores_t.csv").read_text() for i in range(2)]
    assert scores[0] == scores[1]


def test_a_store_that_cannot_be_written_is_one_error_line_and_a_complete_one_is_only_read(tmp_path):
    paths = write_images(tmp_path / "images")[:3]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(data.InputError, match="cannot write the image store"):
        ImageSet(paths, load_size=32, store=tmp_path / "a_file")
    ImageSet(paths, load_size=32, store=tmp_path / "store")
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    ImageSet(paths, load_size=32, store=tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before


@pytest.mark.parametrize("command", [["train", "--real", "r", "--fake", "f", "--out", "o"], ["eval", "run"]])
def test_the_store_option_reaches_the_settings(command, tmp_path):
    from click.testing import CliRunner

    from patchscope.cli import main

    result = CliRunner().invoke(main, [*command, "--store", str(tmp_path / "s"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"store: {tmp_path / 's'}" in result.output


def test_a_resume_may_add_the_store(builtin_dataset, tmp_path):
    _train(builtin_dataset, tmp_path / "run", max_epochs=1)
    settings = dict(real=str(builtin_dataset / "real"), fake=str(builtin_dataset / "fake"), out=str(tmp_path / "run"),
                    model="xception_block1", load_size=32, crop_size=32, batch_size=16, max_epochs=2, device="cpu",
                    seed=0, precision="fp32", store=str(tmp_path / "store"))
    assert fit(TrainConfig(**settings), resume=True)["epochs"] == 2
