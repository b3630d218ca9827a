"""Folders of mixed aspect ratios (issue 21): the shorter side is resized to load_size, then train takes a random
crop_size window and eval the centre one; without crop_size, both take the centred square of the shorter side.
Cached or not, train, eval and the robustness sweep accept them; what still cannot be batched names the option."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics.data import ImageSet, RealFakeDataset, list_images, read_image, resize_image

SHAPES = [(40, 40), (40, 60), (60, 40)]  # square, landscape, portrait (height, width)
PER_SPLIT = 6
TRAIN = ("train", "--model", "xception_block1", "--batch-size", "4", "--max-epochs", "1", "--device", "cpu",
         "--precision", "fp32")


def run(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def normalised(image: np.ndarray) -> np.ndarray:
    return image.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aspect")
    rng = np.random.default_rng(1)
    for kind in ("real", "fake"):
        for split in ("train", "val", "test"):
            folder = root / kind / split
            folder.mkdir(parents=True)
            for i in range(PER_SPLIT):
                noise = rng.integers(0, 256, (*SHAPES[i % 3], 3), dtype=np.uint8)
                Image.fromarray(noise // (2 if kind == "fake" else 1)).save(folder / f"{i:02d}.png")
    return {"real": root / "real", "fake": root / "fake"}


@pytest.mark.parametrize("cache", [True, False])
def test_a_set_keeps_each_image_in_its_own_aspect_ratio(folders, cache):
    images = ImageSet(list_images(folders["real"], "test"), load_size=32, cache=cache)
    assert images.sizes == [(32, 32), (32, 48), (48, 32)] * 2
    assert [images[i].shape[:2] for i in range(3)] == images.sizes[:3]


@pytest.mark.parametrize("crop", [24, None])
@pytest.mark.parametrize("train", [False, True])
def test_items_of_every_aspect_ratio_come_out_square(folders, crop, train):
    sets = [ImageSet(list_images(folders[kind], "test"), load_size=32) for kind in ("real", "fake")]
    dataset = RealFakeDataset(*sets, crop_size=crop, train=train, seed=0)
    side = crop or 32
    for index in range(3):
        resized = resize_image(read_image(dataset.path(index)), 32)
        item = dataset[(0, index)][0].numpy()
        assert item.shape == (3, side, side)
        if not train:  # the centre window, torchvision CenterCrop's rounding
            top, left = round((resized.shape[0] - side) / 2), round((resized.shape[1] - side) / 2)
            np.testing.assert_array_equal(item, normalised(resized[top:top + side, left:left + side]))
        else:  # some window of the resized image, maybe mirrored
            windows = [normalised(resized[t:t + side, l:l + side][:, ::flip])
                       for t in range(resized.shape[0] - side + 1) for l in range(resized.shape[1] - side + 1)
                       for flip in (1, -1)]
            assert any(np.array_equal(item, window) for window in windows)


def test_without_load_or_crop_size_different_shorter_sides_name_both_options(folders, tmp_path):
    paths = [folders["real"] / "test" / "00.png", folders["real"] / "test" / "01.png"]  # 40x40 and 60x40
    same_side = ImageSet(paths)
    assert RealFakeDataset(same_side, same_side, crop_size=None, train=False)[1][0].shape == (3, 40, 40)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "short.png")
    other = ImageSet([tmp_path / "short.png"])
    with pytest.raises(InputError, match=r"short\.png: 50x30 px .*--load-size.*--crop-size"):
        RealFakeDataset(same_side, other, crop_size=None, train=False)
    with pytest.raises(InputError, match=r"smaller than the crop \(36 px\).*--load-size.*--crop-size"):
        RealFakeDataset(ImageSet(paths, load_size=32), ImageSet(paths, load_size=32), crop_size=36, train=True)


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_train_and_eval_take_three_aspect_ratios_through_the_cli(folders, tmp_path, cache):
    real, fake, out = folders["real"], folders["fake"], tmp_path / "run"
    result = run(*TRAIN, "--real", real, "--fake", fake, "--out", out, "--load-size", "32", "--crop-size", "24",
                 cache, "--workers", "0")
    assert result.exit_code == 0, result.output
    result = run("eval", out, "--test", f"t={real},{fake}", "--device", "cpu", "--precision", "fp32",
                 "--perturb", "jpeg:90")  # eval's lazy set, then the sweep's cached one
    assert result.exit_code == 0, result.output
    n = 2 * PER_SPLIT
    assert re.search(rf"^t\s.*\s{n}$", result.output, re.M) and re.search(rf"^jpeg:90\s.*\s{n}$", result.output, re.M)


def test_without_crop_size_train_and_eval_use_the_centre_square(folders, tmp_path):
    """crop_size None cannot come from the command line (None means "not given" there), but from a library call
    or a run saved with it: training runs on the centre squares, and eval of that run through the CLI too."""
    from patchscope.forensics.train import TrainConfig, fit

    real, fake, out = folders["real"], folders["fake"], tmp_path / "run"
    fit(TrainConfig(real=str(real), fake=str(fake), out=str(out), model="xception_block1", load_size=32,
                    crop_size=None, batch_size=4, max_epochs=1, device="cpu", precision="fp32"))
    result = run("eval", out, "--test", f"t={real},{fake}", "--device", "cpu", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert re.search(rf"^t\s.*\s{2 * PER_SPLIT}$", result.output, re.M)
