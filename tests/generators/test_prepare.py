"""Real images go through the generator's pre-processing and are written exactly as the fakes are:
RGB PNGs of the working size, corrupt files skipped and named, splits kept or dealt, resumable."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.common.errors import DatasetError
from patchscope.generators.pgan.zoo import build_pgan_zoo, save_pgan_zoo
from patchscope.generators.prepare import generator_resolution, prepare_reals, read_rgb
from patchscope.generators.sampling import SampleConfig, sample_dataset


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """One of each awkward kind, plus a corrupt file."""
    folder = tmp_path / "mixed"
    _save(folder / "rgba.png", Image.fromarray(np.dstack([_noise(40, 30), np.full((30, 40), 7, np.uint8)])))
    _save(folder / "grey.png", Image.fromarray(_noise(20, 20)[..., 0]))
    _save(folder / "deep.png", Image.fromarray(np.full((24, 24), 32896, np.uint16)))  # 16-bit grey, ~half
    _save(folder / "palette.png", Image.fromarray(_noise(18, 18)).convert("P"))
    _save(folder / "photo.jpg", Image.fromarray(_noise(32, 48)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


def test_rgba_grey_16_bit_and_palette_inputs_become_rgb_pngs_of_the_working_size(mixed_folder: Path,
                                                                                 tmp_path: Path) -> None:
    summary = prepare_reals([mixed_folder], tmp_path / "out", resolution=16, size=8, progress=False)
    made = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert made == ["deep.png", "grey.png", "palette.png", "photo.png", "rgba.png"]
    for name in made:
        assert _pixels(tmp_path / "out" / name).shape == (8, 8, 3)
    assert summary["splits"] == {".": {"count": 6, "existing": 0, "written": 5}}


def test_sixteen_bit_grey_is_rescaled_not_clipped_to_white(mixed_folder: Path) -> None:
    assert np.array_equal(np.unique(np.asarray(read_rgb(mixed_folder / "deep.png"))), [128])
    assert read_rgb(mixed_folder / "rgba.png").mode == "RGB"


def test_corrupt_image_is_skipped_and_named_in_log(mixed_folder: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="patchscope.prepare"):
        summary = prepare_reals([mixed_folder], tmp_path / "out", resolution=16, progress=False)
    assert summary["unreadable"] == [str(mixed_folder / "broken.png")]
    assert not (tmp_path / "out" / "broken.png").exists()
    lines = [r.getMessage() for r in caplog.records if r.name == "patchscope.prepare"]
    assert any("skipped 1 unreadable image" in line and "broken.png" in line for line in lines)


def test_bad_image_policy_error_stops_with_one_line_naming_the_file(mixed_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        prepare_reals([mixed_folder], tmp_path / "out", resolution=16, on_bad_image="error", progress=False)
    assert str(mixed_folder / "broken.png") in str(caught.value) and "\n" not in str(caught.value)


def test_centre_crop_then_two_lanczos_resizes(tmp_path: Path) -> None:
    source = _save(tmp_path / "in" / "wide.png", Image.fromarray(_noise(40, 30)))
    prepare_reals([source], tmp_path / "out", resolution=16, size=8, progress=False)
    with Image.open(source) as image:
        square = image.crop((5, 0, 35, 30)).resize((16, 16), Image.Resampling.LANCZOS)
    expected = np.asarray(square.resize((8, 8), Image.Resampling.LANCZOS))
    assert np.array_equal(_pixels(tmp_path / "out" / "wide.png"), expected)


def test_a_fake_prepared_as_a_real_comes_out_byte_identical_to_the_sampled_one(tmp_path: Path) -> None:
    """The paper's rule: real and fake pass the same pipeline, so only content can differ."""
    torch.manual_seed(0)
    generator, discriminator = build_pgan_zoo(16, latent_dim=8, depth_scale0=8, depth_other_scales=[8, 8])
    generator.discriminator = discriminator
    checkpoint = save_pgan_zoo(generator, tmp_path / "g.pt")
    sample_dataset(SampleConfig(generator=str(checkpoint), out=str(tmp_path / "full"), counts={"train": 3}),
                                progress=False)
    sample_dataset(SampleConfig(generator=str(checkpoint), out=str(tmp_path / "small"), counts={"train": 3},
                                size=8), progress=False)
    prepare_reals([tmp_path / "full" / "train"], tmp_path / "real", resolution=generator_resolution(checkpoint),
                  size=8, progress=False)
    for i in range(3):
        name = f"{i:06d}.png"
        assert (tmp_path / "real" / name).read_bytes() == (tmp_path / "small" / "train" / name).read_bytes()


def test_split_folders_of_the_input_are_kept(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _save(tmp_path / "in" / split / "faces" / f"{i}.jpg", Image.fromarray(_noise(20, 20, i)))
    summary = prepare_reals([tmp_path / "in"], tmp_path / "out", resolution=16, progress=False)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "test/faces/0.png", "test/faces/1.png", "train/faces/0.png", "train/faces/1.png", "train/faces/2.png"]
    assert summary["splits"]["train"]["written"] == 3


def test_counts_deal_a_flat_folder_to_splits_reproducibly(tmp_path: Path) -> None:
    for i in range(10):
        _save(tmp_path / "in" / f"{i:02d}.png", Image.fromarray(_noise(16, 16, i)))
    counts = {"train": 6, "val": 2, "test": 2}
    layouts = []
    for run in ("a", "b"):
        prepare_reals([tmp_path / "in"], tmp_path / run, resolution=16, counts=counts, seed=3, progress=False)
        layouts.append({split: sorted(p.name for p in (tmp_path / run / split).glob("*.png")) for split in counts})
    assert layouts[0] == layouts[1]
    assert {split: len(names) for split, names in layouts[0].items()} == counts
    assert len({name for names in layouts[0].values() for name in names}) == 10
    with pytest.raises(DatasetError, match="asked for 11 images"):
        prepare_reals([tmp_path / "in"], tmp_path / "c", resolution=16, counts={"train": 11}, progress=False)


def test_rerun_keeps_existing_files_and_refuses_other_settings(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_reals([mixed_folder], out, resolution=16, size=8, progress=False)
    before = {p: os.stat(p) for p in out.glob("*.png")}
    (out / "grey.png").unlink()
    summary = prepare_reals([mixed_folder], out, resolution=16, size=8, progress=False)
    assert summary["splits"]["."]["written"] == 1 and summary["splits"]["."]["existing"] == 4
    for path, stat in before.items():
        if path.name != "grey.png":
            assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    with pytest.raises(DatasetError, match="size=8.*size=4"):
        prepare_reals([mixed_folder], out, resolution=16, size=4, progress=False)


def test_sources_that_now_map_to_other_files_are_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        _save(tmp_path / folder / "face.png", Image.fromarray(_noise(16, 16, ord(folder))))
    prepare_reals([tmp_path / "a" / "face.png"], tmp_path / "out", resolution=16, progress=False)
    with pytest.raises(DatasetError, match="sources"):
        prepare_reals([tmp_path / "b" / "face.png"], tmp_path / "out", resolution=16, progress=False)


def test_missing_source_and_empty_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        prepare_reals([tmp_path / "nowhere"], tmp_path / "out", resolution=16, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        prepare_reals([tmp_path / "empty"], tmp_path / "out", resolution=16, progress=False)


def test_sampling_into_a_folder_of_reals_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "in" / "face.png", Image.fromarray(_noise(16, 16)))
    prepare_reals([tmp_path / "in"], tmp_path / "out", resolution=16, progress=False)
    torch.manual_seed(0)
    generator, _ = build_pgan_zoo(16, latent_dim=8, depth_scale0=8, depth_other_scales=[8, 8])
    with pytest.raises(DatasetError, match="kind 'reals', not 'samples'"):
        sample_dataset(SampleConfig(out=str(tmp_path / "out"), counts={"train": 1}), generator, progress=False)
