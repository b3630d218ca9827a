"""Average high-pass spectra: periodic patterns peak at their frequency, flat images vanish, files are written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchscope.analysis.spectra import average_spectrum, compare_spectra, frequencies, high_pass, image_spectrum
from patchscope.common.errors import InputError
from patchscope.forensics.data import ImageSet

SIZE = 32


def noise_images(n: int, seed: int, size: int = SIZE, stripe_period: int | None = None) -> list[np.ndarray]:
    """Grey-level noise around mid-grey; optionally plus vertical cosine stripes of the given period."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = 128 + rng.normal(0, 6, (size, size, 1)) + np.zeros((1, 1, 3))
        if stripe_period:
            pixels += 24 * np.cos(2 * np.pi * np.arange(size) / stripe_period)[None, :, None]
        images.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return images


def test_a_flat_image_has_a_zero_spectrum():
    flat = np.full((SIZE, SIZE, 3), 200, np.uint8)
    assert np.abs(image_spectrum(flat)).max() < 1e-9
    assert np.abs(average_spectrum([flat, flat // 2], color="mean")).max() < 1e-9


def test_the_median_residual_keeps_pixel_stripes_and_drops_smooth_shading():
    ramp = np.tile(np.arange(SIZE, dtype=np.float64) * 4, (SIZE, 1))
    assert np.abs(high_pass(ramp)[1:-1, 1:-1]).max() < 1e-9
    stripes = 24 * np.cos(2 * np.pi * np.arange(SIZE) / 4)[None, :].repeat(SIZE, axis=0)
    assert np.allclose(high_pass(stripes)[:, 1:-1], stripes[:, 1:-1])  # borders are mirrored


@pytest.mark.parametrize("period, color", [(4, "gray"), (8, "gray"), (4, "mean")])
def test_stripes_of_a_period_peak_at_its_frequency(period, color):
    spectrum = average_spectrum(noise_images(6, seed=1, stripe_period=period), color=color)
    assert spectrum.shape == (SIZE, SIZE)
    row, col = np.unravel_index(int(np.argmax(spectrum)), spectrum.shape)
    freqs = frequencies(SIZE)
    assert freqs[row] == 0 and abs(freqs[col]) == pytest.approx(1 / period)
    plain = average_spectrum(noise_images(6, seed=1), color=color)
    assert spectrum[row, col] > plain[row, col] + 2  # the stripes, not the noise, make the peak


def test_averaging_does_not_depend_on_image_order():
    images = noise_images(5, seed=2, stripe_period=4) + noise_images(3, seed=3)
    forward, backward = average_spectrum(images), average_spectrum(images[::-1])
    assert np.allclose(forward, backward, rtol=1e-12, atol=1e-12)
    assert np.allclose(forward, np.mean([image_spectrum(image) for image in images], axis=0))


def test_folders_paths_image_sets_and_arrays_give_the_same_spectrum(tmp_path):
    images = noise_images(4, seed=4, stripe_period=8)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / "set" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    expected = average_spectrum(images)
    for source in (tmp_path / "set", str(tmp_path / "set"), paths, ImageSet(paths)):
        assert np.array_equal(average_spectrum(source), expected)


def test_max_images_takes_an_even_spread_of_the_set():
    images = noise_images(9, seed=5)
    assert np.allclose(average_spectrum(images, max_images=3), average_spectrum([images[0], images[4], images[8]]))


def test_larger_images_are_centre_cropped_or_resized_to_the_size():
    big = noise_images(1, seed=6, size=48, stripe_period=4)[0]
    assert np.array_equal(average_spectrum([big], size=SIZE), image_spectrum(big[8:40, 8:40]))
    resized = average_spectrum([big[:, :40]], size=SIZE, fit="resize")  # 48 x 40 -> 38 x 32 -> 32 x 32
    assert resized.shape == (SIZE, SIZE)


def test_an_image_smaller_than_the_size_is_named_in_the_error():
    with pytest.raises(InputError, match=r"image 1: 16x16 px is smaller than the spectrum size 32 px"):
        average_spectrum(noise_images(1, seed=7) + noise_images(1, seed=8, size=16))


def test_compare_spectra_writes_figure_arrays_and_a_summary_that_finds_the_stripes(tmp_path):
    out = tmp_path / "spectra"
    real, fake = noise_images(6, seed=9), noise_images(6, seed=10, stripe_period=4)
    result = compare_spectra(real, fake, out)
    for name in ("spectra.png", "spectrum_real.npy", "spectrum_fake.npy", "spectrum_diff.npy", "spectra.json"):
        assert (out / name).is_file(), name
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.load(out / "spectrum_real.npy"), average_spectrum(real))
    diff = np.load(out / "spectrum_diff.npy")
    assert np.allclose(diff, np.load(out / "spectrum_fake.npy") - np.load(out / "spectrum_real.npy"))
    summary = json.loads((out / "spectra.json").read_text())
    assert summary["n_real"] == summary["n_fake"] == 6 and summary["size"] == SIZE
    largest = summary["summary"]["difference"]["largest"]
    assert (abs(largest["fx"]), largest["fy"]) == (0.25, 0.0) and largest["value"] > 2
    assert abs(summary["summary"]["fake"]["peak"]["fx"]) == 0.25
    assert result["summary"] == summary["summary"]


def test_compare_spectra_refuses_to_overwrite_without_force(tmp_path):
    images = noise_images(2, seed=11)
    (tmp_path / "spectra.json").write_text("{}")
    with pytest.raises(InputError, match="spectra.json exists; pass --force"):
        compare_spectra(images, images, tmp_path)
    assert not (tmp_path / "spectra.png").exists()
    compare_spectra(images, images, tmp_path, force=True)
    assert json.loads((tmp_path / "spectra.json").read_text())["n_real"] == 2


@pytest.mark.parametrize("options, message", [
    ({"fit": "stretch"}, "fit 'stretch'"),
    ({"color": "rgb"}, "color 'rgb'"),
    ({"max_images": 0}, "max_images >= 1"),
])
def test_bad_options_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        average_spectrum(noise_images(1, seed=12), **options)
