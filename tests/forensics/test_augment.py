"""Training augmentation: Wang et al.'s blur + JPEG, random resized crops and flips, seeded per (seed, epoch, index),
visibly applied, recorded in the run's settings and held fixed on resume."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics import augment, checkpoint
from patchscope.forensics.augment import Augmentation, degradation_rng, resized_crop_box
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.data import RealFakeDataset, make_loader, set_epoch
from patchscope.forensics.perturb import jpeg
from patchscope.forensics.train import TrainConfig, fit


class Arrays:
    """An in-memory image set (the ImageSet interface RealFakeDataset reads)."""

    def __init__(self, images: list[np.ndarray]):
        self.images, self.cached = images, True
        self.paths = [f"img{i}.png" for i in range(len(images))]
        self.sizes = [image.shape[:2] for image in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]


def noise(n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def dataset(augmentation: Augmentation | None, n: int = 6, size: tuple[int, int] = (40, 48), crop: int | None = 32,
            seed: int = 0) -> RealFakeDataset:
    return RealFakeDataset(Arrays(noise(n, *size, seed=1)), Arrays(noise(n, *size, seed=2)), crop_size=crop,
                           train=True, seed=seed, augmentation=augmentation)


def batches(data: RealFakeDataset, batch_size: int, epoch: int = 1) -> torch.Tensor:
    loader = make_loader(data, batch_size, train=True, seed=data.seed)
    set_epoch(loader, epoch)
    return torch.cat([x for x, _, _ in loader])


def items(data: RealFakeDataset, epoch: int = 1) -> torch.Tensor:
    return torch.stack([data[(epoch, i)][0] for i in range(len(data))])


def high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per image."""
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean(dim=(1, 2, 3)) + ((x[..., 1:] - x[..., :-1]) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("batch_size, size, crop", [(2, (40, 48), 32), (4, (24, 24), None), (6, (33, 29), 20)])
def test_probability_zero_leaves_every_batch_bit_for_bit_as_without_augmentation(batch_size, size, crop):
    clean = batches(dataset(None, size=size, crop=crop), batch_size)
    zero = batches(dataset(Augmentation(blur_prob=0.0, jpeg_prob=0.0), size=size, crop=crop), batch_size)
    assert torch.equal(clean, zero)


@pytest.mark.parametrize("batch_size, size", [(2, (40, 48)), (6, (64, 64))])
def test_blur_lowers_high_frequency_energy(batch_size, size):
    clean = batches(dataset(None, size=size), batch_size)
    blurred = batches(dataset(Augmentation(blur_prob=1.0), size=size), batch_size)
    before, after = high_frequency_energy(clean), high_frequency_energy(blurred)
    assert bool((after <= before + 1e-6).all())
    assert after.mean() < 0.5 * before.mean()  # sigma ~ U[0, 3] on noise: most of it is gone


def test_jpeg_changes_pixels_exactly_as_the_drawn_quality_does():
    data = dataset(Augmentation(jpeg_prob=1.0, flip=False), crop=None, size=(32, 32))
    clean = items(dataset(Augmentation(flip=False), crop=None, size=(32, 32)))
    compressed = items(data)
    assert all(not torch.equal(a, b) for a, b in zip(clean, compressed))
    for index in (0, 7):
        rng = degradation_rng(0, 1, index)
        rng.random(), rng.uniform(*augment.BLUR_SIGMA), rng.random()
        quality = int(rng.integers(30, 101))
        image = (data.real if index < data.n_real else data.fake)[index % data.n_real]
        expected = torch.from_numpy(jpeg(image, quality).transpose(2, 0, 1).astype(np.float32)).div(127.5).sub(1)
        assert torch.equal(compressed[index], expected)


def test_the_share_of_degraded_images_follows_the_probability():
    for p in (0.1, 0.5):
        data = dataset(Augmentation(jpeg_prob=p, flip=False), n=200, size=(16, 16), crop=None)
        clean = dataset(Augmentation(flip=False), n=200, size=(16, 16), crop=None)
        changed = np.mean([not torch.equal(data[(3, i)][0], clean[(3, i)][0]) for i in range(len(data))])
        assert abs(changed - p) < 0.06, (p, changed)


@pytest.mark.parametrize("augmentation", [Augmentation(0.5, 0.5), Augmentation(0.5, 0.5, random_resized_crop=True)])
def test_the_same_seed_gives_the_same_batches_whatever_the_batch_size_and_epochs_differ(augmentation):
    a, b = items(dataset(augmentation)), items(dataset(augmentation))
    assert torch.equal(a, b)
    # Items are keyed by (seed, epoch, index): another batch size only regroups the same items.
    four, two = batches(dataset(augmentation), 4), batches(dataset(augmentation), 2)
    assert sorted(t.sum().item() for t in four) == sorted(t.sum().item() for t in two)
    assert sorted(t.sum().item() for t in four) == sorted(t.sum().item() for t in items(dataset(augmentation)))
    assert not torch.equal(items(dataset(augmentation), epoch=1), items(dataset(augmentation), epoch=2))
    assert not torch.equal(items(dataset(augmentation, seed=0)), items(dataset(augmentation, seed=1)))


def test_random_resized_crops_are_crop_sized_boxes_of_allowed_area_and_aspect():
    rng = np.random.default_rng(0)
    for height, width in ((40, 48), (100, 20), (12, 90)):
        for _ in range(200):
            top, left, h, w = resized_crop_box(height, width, rng)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    areas = [h * w / (64 * 64) for _, _, h, w in (resized_crop_box(64, 64, rng) for _ in range(500))]
    assert 0.07 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) == pytest.approx(0.54, abs=0.06)
    plain, resized = items(dataset(Augmentation())), items(dataset(Augmentation(random_resized_crop=True)))
    assert plain.shape == resized.shape == (12, 3, 32, 32) and not torch.equal(plain, resized)
    uncropped = items(dataset(Augmentation(random_resized_crop=True), crop=None, size=(24, 30)))
    assert uncropped.shape == (12, 3, 24, 24)


def test_without_flips_an_uncropped_square_image_comes_out_unchanged():
    data = dataset(Augmentation(flip=False), crop=None, size=(20, 20))
    image = torch.from_numpy(data.real[0].transpose(2, 0, 1).astype(np.float32)).div(127.5).sub(1)
    for epoch in range(1, 6):
        assert torch.equal(data[(epoch, 0)][0], image)
    flipped = dataset(Augmentation(), crop=None, size=(20, 20))
    assert any(torch.equal(flipped[(epoch, 0)][0], image.flip(-1)) for epoch in range(1, 6))


def test_validation_and_evaluation_items_are_never_augmented():
    images = noise(3, 24, 24, seed=5)
    val = RealFakeDataset(Arrays(images), Arrays(images), crop_size=None, train=False,
                          augmentation=Augmentation(1.0, 1.0, True))
    for i in range(3):
        assert torch.equal(val[i][0], torch.from_numpy(images[i].transpose(2, 0, 1).astype(np.float32)).div(127.5).sub(1))


# ----------------------------------------------------------------------------- settings and runs

def test_presets_and_explicit_probabilities_resolve_as_documented():
    assert TrainConfig().augmentation() == Augmentation(0.0, 0.0, False, True)
    assert TrainConfig(augment="blur_jpeg_0.1").augmentation() == Augmentation(0.1, 0.1)
    assert TrainConfig(augment="blur_jpeg_0.5", jpeg_prob=0.0).augmentation() == Augmentation(0.5, 0.0)
    assert TrainConfig(blur_prob=0.3, random_resized_crop=True, flip=False).augmentation() == Augmentation(
        0.3, 0.0, True, False)
    for field, value, message in (("blur_prob", 1.5, "blur_prob=1.5: expected a finite number >= 0 and <= 1"),
                                  ("augment", "blur_jpeg_0.3", "augment='blur_jpeg_0.3': expected one of none"),
                                  ("flip", "yes", "flip='yes': expected true or false")):
        with pytest.raises(InputError, match=re.escape(message)):
            TrainConfig(**{field: value})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_builtin_dataset(tmp_path_factory.mktemp("tiny"), {"train": 8, "val": 4, "test": 2}, size=24)


def config(data, out, **changes) -> TrainConfig:
    settings = dict(real=str(data / "real"), fake=str(data / "fake"), out=str(out), model="xception_block1",
                    load_size=24, crop_size=20, batch_size=4, max_epochs=2, device="cpu", precision="fp32",
                    init="kaiming", workers=0, augment="blur_jpeg_0.5", random_resized_crop=True)
    return TrainConfig(**{**settings, **changes})


def test_a_resumed_augmented_run_trains_on_the_same_batches(tiny, tmp_path):
    fit(config(tiny, tmp_path / "straight"))

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config(tiny, tmp_path / "resumed"), on_epoch_end=stop)
    fit(config(tiny, tmp_path / "resumed"), resume=True)
    a, _ = checkpoint.load_classifier(tmp_path / "straight", "last")
    b, _ = checkpoint.load_classifier(tmp_path / "resumed", "last")
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1]
    saved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert saved["augment"] == "blur_jpeg_0.5" and saved["random_resized_crop"] is True and saved["flip"] is True


@pytest.mark.parametrize("change", [{"augment": "blur_jpeg_0.1"}, {"jpeg_prob": 0.0}, {"random_resized_crop": False},
                                   {"flip": False}])
def test_resume_refuses_different_augmentation(tiny, tmp_path, change):
    fit(config(tiny, tmp_path / "run", max_epochs=1))
    name = next(iter(change))
    with pytest.raises(InputError, match=f"cannot resume with different {name}"):
        fit(config(tiny, tmp_path / "run", max_epochs=2, **change), resume=True)


def test_the_command_line_records_the_augmentation(tiny, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--real", str(tiny / "real"), "--fake", str(tiny / "fake"), "--out",
                                       str(out), "--augment", "blur_jpeg_0.1", "--jpeg-prob", "0.25", "--no-flip",
                                       "--random-resized-crop", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert (printed["augment"], printed["blur_prob"], printed["jpeg_prob"]) == ("blur_jpeg_0.1", None, 0.25)
    assert printed["flip"] is False and printed["random_resized_crop"] is True and not out.exists()
