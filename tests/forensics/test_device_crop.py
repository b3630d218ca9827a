"""crop_on=device batches (uint8 images before the crop + windows, cropped by `forensics.device_crop` where the model
runs) against crop_on=host batches (float crops made per item in numpy): the same model inputs, bit for bit.

Images are random noise, so a window one pixel off, a flip on the wrong axis or rows and columns swapped changes
pixels; most images are taller than wide (48x40 after resizing), so a transposed H/W is seen too. Crops and flips are
checked to vary (a constant window would pass an equality test of a set where nothing varies), and the windows are
checked against an independent rewrite of the generator draws (crop top, crop left, then the flip coin), so both
modes reordering their draws the same way is caught too. Runs on CPU with crop_on forced to device; the CUDA checks
run only where a GPU is.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from patchscope.common.errors import InputError
from patchscope.forensics.augment import Augmentation, degradation_rng, resized_crop_box
from patchscope.forensics.data import ImageSet, RealFakeDataset, make_loader, set_epoch
from patchscope.forensics.device_crop import (UncroppedBatch, collate_uncropped, crop_batch, resolve_crop_on,
                                              to_device_batch)

CPU = torch.device("cpu")
SOURCES = {"tall": (60, 50), "square": (50, 50)}  # H x W of the PNG files: load 40 -> 48x40, load 37 -> 44x37
N_REAL, N_FAKE = 5, 7  # unequal: the smaller class cycles


def noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_crop")
    paths = {}
    for name, (height, width) in SOURCES.items():
        for kind, count, seed in (("real", N_REAL, 0), ("fake", N_FAKE, 100)):
            folder = root / name / kind
            folder.mkdir(parents=True)
            paths[name, kind] = []
            for i in range(count):
                Image.fromarray(noise(seed + i + len(name), height, width)).save(folder / f"{i:02d}.png")
                paths[name, kind].append(folder / f"{i:02d}.png")
    return paths


def dataset(files, source="tall", load=40, crop=32, train=True, augmentation=None, seed=3, **image_options):
    real, fake = (ImageSet(files[source, kind], load_size=load, **image_options) for kind in ("real", "fake"))
    return RealFakeDataset(real, fake, crop_size=crop, train=train, seed=seed, augmentation=augmentation)


def mixed(files, train=True, augmentation=None):
    """50x50 reals beside 60x50 fakes, no load size: two shapes before the crop."""
    return RealFakeDataset(ImageSet(files["square", "real"]), ImageSet(files["tall", "fake"]), crop_size=29,
                           train=train, seed=3, augmentation=augmentation)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bits: -0.0 and 0.0, NaNs told apart


def compare(data, batch_size, train, epochs=(0, 1, 2), workers=0, memory_format=torch.channels_last, **shard):
    """Both loaders over `epochs`: every batch bit for bit; returns the device batches' rows
    (epoch, index, top, left, size, flip)."""
    loaders = [make_loader(data, batch_size, train, seed=data.seed, workers=workers, crop_on=mode, **shard)
               for mode in ("host", "device")]
    windows = []
    for epoch in epochs:
        for loader in loaders:
            set_epoch(loader, epoch)
        host, device = (list(loader) for loader in loaders)
        assert len(host) == len(device) > 0
        for h, d in zip(host, device):
            assert isinstance(d, UncroppedBatch) and not isinstance(h, UncroppedBatch)
            assert d.pixels.dtype == torch.uint8 and d.windows.dtype == torch.int64
            hx, hy, hi = to_device_batch(h, CPU, memory_format)
            dx, dy, di = to_device_batch(d, CPU, memory_format)
            assert_same_bits(hx, dx)
            assert dx.is_contiguous(memory_format=memory_format)
            assert torch.equal(hy, dy) and torch.equal(hi, di)
            windows += [(epoch, i, *row) for i, row in zip(di.tolist(), d.windows.tolist())]
    return windows


def assert_varied(windows, flips: bool, moves: bool) -> None:
    """Both flips occur when flipping; windows move when randomly cropped."""
    assert {row[5] for row in windows} == ({0, 1} if flips else {0})
    assert (len({row[2:4] for row in windows}) > 3) == moves


TRAIN_CASES = {  # source, load size, crop size, augmentation, batch size
    "crop 32 of 48x40": ("tall", 40, 32, Augmentation(), 2),
    "crop 29 of 44x37 (odd)": ("tall", 37, 29, Augmentation(), 8),
    "no crop size: 40 square of 48x40": ("tall", 40, None, Augmentation(), 4),
    "square, no flip": ("square", 40, 32, Augmentation(flip=False), 8),
    "no load size": ("tall", None, 29, Augmentation(), 4),
    "random resized crop": ("tall", 40, 32, Augmentation(random_resized_crop=True), 4),
    "random resized crop, no crop size": ("tall", 37, None, Augmentation(random_resized_crop=True), 2),
    "blur + jpeg": ("tall", 40, 32, Augmentation(blur_prob=0.5, jpeg_prob=0.5), 8),
    "blur + jpeg + random resized crop": ("tall", 37, 29, Augmentation(0.5, 0.5, random_resized_crop=True), 4),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_batches_are_the_host_batches_bit_for_bit(files, case):
    source, load, crop, augmentation, batch = TRAIN_CASES[case]
    data = dataset(files, source, load, crop, train=True, augmentation=augmentation)
    windows = compare(data, batch, train=True)
    assert len(windows) == 3 * 2 * -(-N_FAKE // (batch // 2)) * (batch // 2)  # 3 epochs covering the fakes
    moves = crop is not None and not augmentation.random_resized_crop
    assert_varied(windows, flips=augmentation.flip, moves=moves)


EVAL_CASES = {"crop 32 of 48x40": ("tall", 40, 32), "crop 29 of 44x37: margins 7.5 and 4": ("tall", 37, 29),
              "no crop size: 40 square of 48x40": ("tall", 40, None), "square, whole": ("square", 37, None),
              "no load size": ("square", None, 29)}


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluation_batches_are_the_host_batches_bit_for_bit(files, case, batch):
    source, load, crop = EVAL_CASES[case]
    windows = compare(dataset(files, source, load, crop, train=False), batch, train=False, epochs=(0, 1))
    assert [row[0] for row in windows].count(0) == N_REAL + N_FAKE  # every item once, nothing padded
    assert {row[5] for row in windows} == {0} and len({row[2:5] for row in windows}) == 1  # one centre window


def test_eval_windows_are_torchvision_centre_crops_with_its_rounding(files):
    """Independent of the dataset's own window code: 44x37 -> 29 has a margin of 7.5 rows (rounded to 8)."""
    data = dataset(files, "tall", 37, 29, train=False)
    batch = next(iter(make_loader(data, 12, train=False, crop_on="device")))
    x, _, _ = to_device_batch(batch, CPU)
    for i in range(len(data)):
        image = data.real[i] if i < N_REAL else data.fake[i - N_REAL]
        expected = T.CenterCrop(29)(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
        assert_same_bits(x[i], expected.float() / torch.tensor(127.5) - torch.tensor(1.0))
    assert batch.windows[0].tolist() == [8, 4, 29, 0]


def expected_window(data: RealFakeDataset, epoch: int, index: int):
    """The draws of the original host code, written out: crop top, crop left, then the flip coin."""
    image = data.real[index] if index < data.n_real else data.fake[index - data.n_real]
    if data.augmentation.degrades:
        image = data.augmentation.degrade(image, degradation_rng(data.seed, epoch, index))
    rng = np.random.default_rng([data.seed, epoch, index])
    (height, width), size = image.shape[:2], data.crop_size or min(image.shape[:2])
    if data.augmentation.random_resized_crop:
        resized_crop_box(height, width, rng)
        top = left = 0
    else:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    flip = data.augmentation.flip and rng.random() < 0.5
    return image, [top, left, size, int(flip)]


@pytest.mark.parametrize("augmentation", [Augmentation(), Augmentation(0.5, 0.5, random_resized_crop=True)])
def test_windows_come_from_the_original_draws_and_crop_the_loaded_image(files, augmentation):
    data = dataset(files, "tall", 37, 29, train=True, augmentation=augmentation)
    loader = make_loader(data, 4, train=True, seed=data.seed, crop_on="device")
    for epoch in (0, 3):
        set_epoch(loader, epoch)
        for batch in loader:
            x, _, _ = to_device_batch(batch, CPU)
            for k, index in enumerate(batch.indices.tolist()):
                image, window = expected_window(data, epoch, index)
                assert batch.windows[k].tolist() == window
                if not augmentation.random_resized_crop:
                    top, left, size, flip = window
                    crop = image[top:top + size, left:left + size][:, ::-1 if flip else 1]
                    expected = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)
                    assert np.array_equal(x[k].numpy().view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("train", [True, False])
def test_batches_match_with_two_loader_workers(files, train):
    augmentation = Augmentation(0.5, 0.5, random_resized_crop=True) if train else None
    compare(dataset(files, "tall", 37, 29, train=train, augmentation=augmentation), 4, train, epochs=(0, 1),
            workers=2)


@pytest.mark.parametrize("train", [True, False])
def test_batches_match_in_contiguous_layout_and_from_lazy_sets(files, train):
    data = dataset(files, "tall", 40, 32, train=train, cache=False)
    compare(data, 4, train, epochs=(1,), memory_format=torch.contiguous_format)


def test_read_only_store_images_are_batched_without_a_warning(files, tmp_path):
    data = dataset(files, "tall", 40, 32, train=True, store=tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable NumPy array" warning
        compare(data, 4, train=True, epochs=(0,))


@pytest.mark.parametrize("train", [True, False])
def test_torchrun_shards_are_the_host_shards(files, train):
    """Each rank's share (the unchanged per-rank samplers) in device mode is that rank's host share."""
    data = dataset(files, "tall", 40, 32, train=train)
    shares = [compare(data, 2 if train else 3, train, epochs=(0, 1), rank=rank, world_size=2) for rank in (0, 1)]
    assert {row[1] for row in shares[0]}.isdisjoint(row[1] for row in shares[1]) or train  # eval: no padding
    assert [row[1] for row in shares[0]] != [row[1] for row in shares[1]]


def test_every_uint8_value_scales_to_the_host_float32_bits():
    values = torch.arange(256, dtype=torch.uint8).repeat(3).reshape(1, 16, 16, 3)
    x = crop_batch(values, torch.tensor([[0, 0, 16, 0]]), 16)
    host = values.numpy().transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1)
    assert np.array_equal(x.numpy().view(np.int32), host.view(np.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_cuda_batches_are_the_host_batches_bit_for_bit(files, memory_format):
    """CUDA divides by a host scalar as a product with its reciprocal: crop_batch must not, nor differ elsewhere."""
    cuda = torch.device("cuda")
    values = torch.arange(256, dtype=torch.uint8).repeat(3).reshape(1, 16, 16, 3)
    window = torch.tensor([[0, 0, 16, 0]])
    on_cuda = crop_batch(values.to(cuda), window.to(cuda), 16, memory_format)
    assert torch.equal(on_cuda.cpu().view(torch.int32), crop_batch(values, window, 16).view(torch.int32))
    data = dataset(files, "tall", 37, 29, train=True, augmentation=Augmentation(0.5, 0.5))
    loaders = [make_loader(data, 4, train=True, seed=3, device_type="cuda", crop_on=mode) for mode in ("host", "auto")]
    for h, d in zip(*loaders):
        assert isinstance(d, UncroppedBatch) and d.pixels.is_pinned()
        hx, dx = (to_device_batch(batch, cuda, memory_format)[0] for batch in (h, d))
        assert dx.is_cuda and dx.is_contiguous(memory_format=memory_format)
        assert torch.equal(hx.view(torch.int32), dx.view(torch.int32))


# ----------------------------------------------------------------------------- choosing the format

def test_auto_picks_device_on_cuda_for_one_shape_and_host_otherwise(files, caplog):
    one = dataset(files, "tall", 40, 32)
    with caplog.at_level(logging.INFO, logger="patchscope.data"):
        assert resolve_crop_on("auto", one, "cuda") == "device"
        assert resolve_crop_on("auto", one, "cpu") == "host"
        # a 16 px crop of 48x40 images: the uint8 images (1,920 px) outweigh the float crops (4 x 256 px)
        assert resolve_crop_on("auto", dataset(files, "tall", 40, 16), "cuda") == "host"
        assert resolve_crop_on("device", dataset(files, "tall", 40, 16), "cpu") == "device"  # asked: honoured
        assert resolve_crop_on("auto", mixed(files), "cuda") == "host"
        assert resolve_crop_on("host", one, "cuda") == "host"
        assert resolve_crop_on("device", one, "cpu") == "device"
    assert not caplog.records  # auto says nothing: it never promised the device
    with pytest.raises(InputError, match="crop_on='gpu'"):
        resolve_crop_on("gpu", one, "cuda")


@pytest.mark.parametrize("train", [True, False])
def test_explicit_device_with_images_of_several_shapes_falls_back_to_host_once(files, caplog, train):
    data = mixed(files, train)
    with caplog.at_level(logging.INFO, logger="patchscope.data"):
        loader = make_loader(data, 4, train=train, seed=3, crop_on="device")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "crop_on=device" in lines[0] and "50x50 and 50x60" in lines[0]
    assert all(not isinstance(batch, UncroppedBatch) for batch in loader)


def test_a_random_resized_crop_batches_uncropped_whatever_the_shapes(files):
    """It is made on the host at the crop size, so the images it gives share one shape."""
    data = mixed(files, True, Augmentation(random_resized_crop=True))
    assert resolve_crop_on("device", data, "cpu") == "device" and resolve_crop_on("auto", data, "cuda") == "device"
    compare(data, 4, train=True, epochs=(0,))
    assert resolve_crop_on("device", mixed(files, False), "cpu") == "host"  # validation is not augmented


def test_a_batch_of_two_shapes_is_refused_with_the_shapes_named():
    items = [(np.zeros((4, 6, 3), np.uint8), (0, 0, 4, False), 0, 0),
             (np.zeros((6, 4, 3), np.uint8), (0, 0, 4, False), 1, 1)]
    with pytest.raises(InputError, match="6x4 and 4x6 px"):
        collate_uncropped(items)


def test_a_window_outside_its_image_is_refused_not_read_from_a_neighbour():
    pixels = torch.zeros(2, 10, 12, 3, dtype=torch.uint8)
    for top, left in ((0, 5), (3, 0), (-1, 0)):  # 8 px: left 5 leaves 12 px, top 3 leaves 10 px
        batch = UncroppedBatch(pixels, torch.tensor([[0, 0, 8, 0], [top, left, 8, 1]]), torch.zeros(2), torch.arange(2))
        with pytest.raises(ValueError, match="of 8 px leave 12x10 px images"):
            to_device_batch(batch, torch.device("cpu"))
    fits = UncroppedBatch(pixels, torch.tensor([[2, 4, 8, 0], [0, 0, 8, 1]]), torch.zeros(2), torch.arange(2))
    assert to_device_batch(fits, torch.device("cpu"))[0].shape == (2, 3, 8, 8)
