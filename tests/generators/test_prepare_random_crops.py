"""`prepare --random-crops`: N crops per photo by the demo's recipe, photos (not crops) dealt to the
splits, reproducible by seed, each crop's photo and box in the manifest; too-small photos skipped and named."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.cli import main
from patchscope.common.crops import CropBox, cut_crop, draw_crop
from patchscope.common.errors import DatasetError
from patchscope.generators.random_crops import prepare_random_crops

# Mixed aspect ratios: landscape, portrait, square, very wide.
SHAPES = ((96, 64), (64, 96), (80, 80), (160, 48), (72, 56))


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        width, height = SHAPES[i % len(SHAPES)]
        pixels = np.random.RandomState(i).randint(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:02d}.png")
    return folder


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.mark.parametrize("n_photos, n_crops, counts", [(5, 3, {"train": 3, "val": 1, "test": 1}),
                                                      (13, 7, {"train": 9, "val": 2, "test": 2}),
                                                      (13, 1, {"train": 5, "test": 8})])
def test_no_photo_lends_crops_to_two_splits(tmp_path: Path, n_photos: int, n_crops: int, counts: dict) -> None:
    photos = _photos(tmp_path / "photos", n_photos)
    summary = prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=n_crops, crop_size=16,
                                   counts=counts, progress=False)
    files = _manifest(tmp_path / "out")["files"]
    splits_of = defaultdict(set)
    for output, record in files.items():
        splits_of[record["source"]].add(output.split("/")[0])
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    per_split = defaultdict(set)
    for source, (split,) in splits_of.items():
        per_split[split].add(source)
    assert {split: len(sources) for split, sources in per_split.items()} == counts
    assert len(files) == sum(counts.values()) * n_crops == len(_pngs(tmp_path / "out"))
    assert summary["splits"]["train"] == {"photos": counts["train"], "count": counts["train"] * n_crops,
                                          "existing": 0, "written": counts["train"] * n_crops}


def test_same_seed_same_crops_and_another_seed_other_crops(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 5)
    runs = {}
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        prepare_random_crops([photos], tmp_path / name, resolution=16, random_crops=4, counts={"train": 3, "test": 2},
                             seed=seed, progress=False)
        runs[name] = (_pngs(tmp_path / name), _manifest(tmp_path / name)["files"])
    assert runs["a"] == runs["b"]
    assert runs["a"][1] != runs["c"][1]


def test_crop_boxes_lie_in_their_photo_and_the_pixels_are_that_box(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 5)
    prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=20, crop_size=16, max_scale=2.5,
                         progress=False)
    files = _manifest(tmp_path / "out")["files"]
    for output, record in files.items():
        width, height = record["photo_size"]
        left, top, right, bottom = record["box"]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == bottom - top and 16 <= right - left <= min(40, width, height)
        with Image.open(record["source"]) as photo:
            assert photo.size == (width, height)
            expected = cut_crop(np.asarray(photo.convert("RGB")),
                                CropBox(left, top, right - left, record["flipped"]), 16)
        with Image.open(tmp_path / "out" / output) as made:
            np.testing.assert_array_equal(np.asarray(made), expected)
    assert {record["flipped"] for record in files.values()} == {True, False}


def test_a_resize_to_the_working_size_follows_the_crop(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 2)
    prepare_random_crops([photos], tmp_path / "out", resolution=32, random_crops=2, crop_size=24, size=8,
                         progress=False)
    for png in (tmp_path / "out").glob("*.png"):
        with Image.open(png) as image:
            assert image.size == (8, 8) and image.mode == "RGB"


def test_too_small_photos_are_skipped_and_named_or_refused(tmp_path: Path, caplog) -> None:
    photos = _photos(tmp_path / "photos", 3)
    Image.new("RGB", (40, 12)).save(photos / "strip.png")
    with caplog.at_level(logging.WARNING, logger="patchscope.prepare"):
        summary = prepare_random_crops([photos], tmp_path / "out", resolution=32, random_crops=2, progress=False)
    assert summary["too_small"] == [str(photos / "strip.png")]
    assert "skipped 1 photo(s) smaller than the 32 px crop" in caplog.text and "strip.png (40x12 px" in caplog.text
    assert not any("strip" in name for name in _pngs(tmp_path / "out"))
    assert "strip.png" in next(iter(_manifest(tmp_path / "out")["too_small"]))
    with pytest.raises(DatasetError, match=r"strip\.png: 40x12 px, smaller than the 32 px crop"):
        prepare_random_crops([photos], tmp_path / "strict", resolution=32, random_crops=2, on_bad_image="error",
                             progress=False)
    with pytest.raises(DatasetError, match=r"no photo to crop \(0 unreadable, 4 smaller than the 100 px crop\)"):
        prepare_random_crops([photos], tmp_path / "none", resolution=100, random_crops=2, progress=False)


def test_counts_are_photos_and_too_many_are_refused(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 5)
    with pytest.raises(DatasetError, match="asked for 6 photos .* only 5 can be cropped; .* count photos, not crops"):
        prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=50,
                             counts={"train": 4, "test": 2}, progress=False)


def test_a_rerun_resumes_and_other_settings_are_refused(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 5)
    first = prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=3, progress=False)
    made = _pngs(tmp_path / "out")
    victim = sorted((tmp_path / "out").glob("*.png"))[4]
    victim.unlink()
    again = prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=3, progress=False)
    assert _pngs(tmp_path / "out") == made
    assert first["splits"]["."]["written"] == 15 and again["splits"]["."] == {"photos": 5, "count": 15,
                                                                               "existing": 14, "written": 1}
    with pytest.raises(DatasetError, match="made with random_crops=3, asked for random_crops=4"):
        prepare_random_crops([photos], tmp_path / "out", resolution=16, random_crops=4, progress=False)


def test_the_cli_takes_random_crops_and_refuses_crop_options_without_them(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 5)
    runner = CliRunner()
    result = runner.invoke(main, ["prepare", str(photos), "--resolution", "16", "--random-crops", "2",
                                  "--crop-size", "20", "--crop-scale", "1", "--train", "3", "--val", "1",
                                  "--test", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = _manifest(tmp_path / "out")
    assert manifest["crop_size"] == 20 and manifest["max_scale"] == 1.0 and manifest["crop"] == "random"
    assert all(r["box"][2] - r["box"][0] == 20 for r in manifest["files"].values())
    assert len(list((tmp_path / "out" / "train").glob("*.png"))) == 6
    for args in (["--crop-size", "20"], ["--random-crops", "2", "--crop", "none"]):
        result = runner.invoke(main, ["prepare", str(photos), "--resolution", "16", *args,
                                      "--out", str(tmp_path / "other")])
        assert result.exit_code == 2 and "--random-crops" in result.output


def test_the_recipe_is_the_demos_and_its_crops_are_unchanged() -> None:
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    # Digests of random_crops(builtin_photos(), ...) from before the recipe moved to common.crops.
    photos = builtin_photos()
    for (n, size, seed), digest in {(40, 32, 0): "e45c424bc7bb29217f501b1f976f6b6227d4fe7f49e3f61627bebd74cb3e9a9b",
                                    (25, 20, 3): "2421477a14f8a31b1796786dd3b097fd9cbfad06f169674e9a0c3a5a66225de4"}.items():
        assert hashlib.sha256(np.stack(random_crops(photos, n, size, seed)).tobytes()).hexdigest() == digest


def test_draw_crop_refuses_a_photo_smaller_than_the_crop() -> None:
    with pytest.raises(ValueError, match="a 40x12 photo is smaller than a 32 px crop"):
        draw_crop(np.random.default_rng(0), 12, 40, 32)


def test_a_photo_named_twice_or_copied_is_cropped_once_so_no_split_shares_it(tmp_path, caplog):
    """A manifest naming a photo of the folder beside it, and a byte-identical copy, used to be dealt as other photos."""
    import logging
    import shutil

    import numpy as np
    from PIL import Image

    from patchscope.generators.random_crops import prepare_random_crops

    photos = tmp_path / "ph"
    photos.mkdir()
    rng = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rng.randint(0, 256, (64, 80, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    shutil.copy(photos / "p1.png", tmp_path / "copy_of_p1.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'p0.png'}\n{tmp_path / 'copy_of_p1.png'}\n")
    with caplog.at_level(logging.WARNING):
        summary = prepare_random_crops([str(photos), str(listing)], tmp_path / "out", resolution=16, random_crops=2,
                                       crop_size=16, counts={"train": 2, "test": 2}, seed=0)
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert "skipped 2 duplicate photo(s)" in caplog.text
    splits: dict[str, set[str]] = {}
    for output, record in manifest["files"].items():
        splits.setdefault(record["source"], set()).add(output.split("/")[0])
    assert len(splits) == 4 and all(len(s) == 1 for s in splits.values())
