"""Test-time perturbations: JPEG and blur behaviour, spec parsing, and the perturbed image set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.common.errors import InputError
from patchscope.forensics.builtin_images import builtin_photos, random_crops
from patchscope.forensics.data import ImageSet, RealFakeDataset
from patchscope.forensics.perturb import Perturbation, PerturbedImageSet, blur, jpeg, parse_perturbation, parse_perturbations


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return random_crops(builtin_photos(), 3, 48, seed=1)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def read_only(image: np.ndarray) -> np.ndarray:
    image = image.copy()
    image.flags.writeable = False  # cached ImageSet items are read-only views
    return image


def test_jpeg_loses_more_as_quality_falls_and_keeps_shape_and_dtype(photos):
    for photo in photos:
        errors = [mean_abs_diff(jpeg(read_only(photo), q), photo) for q in (95, 75, 30)]
        assert errors[0] > 0.3 and errors[0] < errors[1] < errors[2]
        out = jpeg(photo, 50)
        assert out.dtype == np.uint8 and out.shape == photo.shape


def test_jpeg_at_quality_100_is_near_identity_without_chroma_subsampling(photos):
    for photo in photos:
        assert mean_abs_diff(jpeg(photo, 100, subsampling="4:4:4"), photo) < 1.0
        gray = np.repeat(photo.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        # Grey images have no chroma to subsample: the default settings are near-lossless too.
        assert mean_abs_diff(jpeg(gray, 100), gray) < 1.0


def test_jpeg_is_deterministic(photos):
    assert np.array_equal(jpeg(photos[0], 60), jpeg(photos[0].copy(), 60))


def test_blur_at_sigma_0_is_the_identity_and_returns_a_writable_copy(photos):
    out = blur(read_only(photos[0]), 0)
    assert np.array_equal(out, photos[0]) and out.flags.writeable


def test_blur_spreads_a_line_with_the_requested_sigma_in_both_directions():
    # A bright line rather than a point: its 1-D profile stays well above uint8 rounding.
    image = np.zeros((41, 41, 3), np.uint8)
    image[:, 20] = 255
    offsets = np.arange(41) - 20
    for sigma in (1.0, 2.0):
        out = blur(read_only(image), sigma)
        profile = out[20, :, 0].astype(np.float64)
        assert (profile * offsets ** 2).sum() / profile.sum() == pytest.approx(sigma ** 2, rel=0.05)
        assert np.array_equal(out[..., 0], out[..., 2])  # channels blurred alike, not mixed
        turned = blur(np.ascontiguousarray(image.transpose(1, 0, 2)), sigma)
        assert np.array_equal(turned, out.transpose(1, 0, 2))  # the same kernel vertically


def test_blur_smooths_noise_and_keeps_a_flat_image_flat(photos):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert blur(noise, 2).std() < 0.25 * noise.std()
    flat = np.full((16, 16, 3), 77, np.uint8)
    assert np.array_equal(blur(flat, 3), flat)


def test_parse_perturbation_gives_one_perturbation_per_level_in_order():
    assert parse_perturbation("jpeg:95,75,50") == [Perturbation("jpeg", 95), Perturbation("jpeg", 75),
                                                   Perturbation("jpeg", 50)]
    assert parse_perturbation(" Blur: 0, 1.5 ,2") == [Perturbation("blur", 0), Perturbation("blur", 1.5),
                                                     Perturbation("blur", 2)]
    assert [p.name for p in parse_perturbations(["jpeg:90", "blur:0.5,1"])] == ["jpeg:90", "blur:0.5", "blur:1"]


@pytest.mark.parametrize("spec, message", [
    ("jpeg", "expected KIND:LEVEL"),
    (":90", "expected KIND:LEVEL"),
    ("jpg:90", "unknown kind 'jpg'; expected one of jpeg, blur"),
    ("jpeg:", "empty level"),
    ("jpeg:90,,50", "empty level"),
    ("jpeg:high", "level 'high' is not a number"),
    ("jpeg:101", "level '101': JPEG quality must be an integer from 1 to 100"),
    ("jpeg:0", "must be an integer from 1 to 100"),
    ("jpeg:75.5", "must be an integer from 1 to 100"),
    ("blur:-1", "level '-1': blur sigma must be a finite number >= 0"),
    ("blur:nan", "must be a finite number >= 0"),
    ("blur:1,2,1", "level 1 given more than once"),
])
def test_bad_perturbation_specs_are_one_line_input_errors(spec, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_perturbation(spec)
    assert "\n" not in str(caught.value) and repr(spec) in str(caught.value)


def test_the_same_level_in_two_specs_is_refused():
    with pytest.raises(InputError, match="jpeg:90 given more than once"):
        parse_perturbations(["jpeg:90,80", "jpeg:90"])


def test_a_perturbation_with_an_impossible_level_cannot_be_made():
    with pytest.raises(ValueError, match="JPEG quality must be an integer from 1 to 100"):
        Perturbation("jpeg", 101)
    with pytest.raises(ValueError, match="blur sigma must be a finite number >= 0"):
        Perturbation("blur", -0.5)


def test_perturbation_name_parses_back_to_the_same_perturbation():
    for perturbation in (Perturbation("jpeg", 75), Perturbation("blur", 1.5), Perturbation("blur", 0)):
        assert parse_perturbation(perturbation.name) == [perturbation]


@pytest.fixture()
def image_sets(tmp_path, photos):
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(photo).save(paths[-1])
    return ImageSet(paths[:2], cache=True), ImageSet(paths[2:], cache=True)


def test_perturbed_image_set_items_equal_the_perturbed_base_items(image_sets):
    real, _ = image_sets
    for perturbation in (Perturbation("jpeg", 50), Perturbation("blur", 1.5)):
        perturbed = PerturbedImageSet(real, perturbation)
        assert len(perturbed) == len(real) == 2
        assert perturbed.paths == real.paths and perturbed.sizes == real.sizes
        assert perturbed.skipped == real.skipped and perturbed.cached is True
        for i in range(len(real)):
            expected = perturbation(real[i])
            assert np.array_equal(perturbed[i], expected)
            assert not np.array_equal(expected, real[i])
            assert np.array_equal(perturbed[i], perturbed[i])  # deterministic on every access


def test_real_fake_dataset_accepts_perturbed_sets(image_sets):
    real, fake = image_sets
    perturbation = Perturbation("jpeg", 40)
    dataset = RealFakeDataset(PerturbedImageSet(real, perturbation), PerturbedImageSet(fake, perturbation),
                              crop_size=32, train=False)
    x, label, index = dataset[2]
    assert (label, index, tuple(x.shape)) == (1, 2, (3, 32, 32))
    top = (48 - 32) // 2
    expected = perturbation(fake[0])[top:top + 32, top:top + 32].transpose(2, 0, 1)
    assert torch.equal(x, torch.from_numpy(expected.astype(np.float32)) / 127.5 - 1.0)
