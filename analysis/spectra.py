"""Average high-pass spectra of image sets (Wang et al.): residual after a 3x3 median filter, log |FFT|, averaged.

Used by `patchscope spectra` to compare real and fake sets: periodic generator artifacts show as peaks.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.ndimage import median_filter

from patchscope.common.atomic import write_bytes, write_json
from patchscope.common.errors import InputError
from patchscope.common.images import BadImageError, read_image
from patchscope.common.progress import progress_bar
from patchscope.forensics.data import BAD_IMAGE_POLICIES, ImageSet, list_images, resize_image
from patchscope.forensics.figures import figure_format, save_figure

log = logging.getLogger("patchscope.spectra")

FITS = ("crop", "resize")
COLORS = ("gray", "mean")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what Pillow's "L" conversion uses
# Summary band: frequencies whose larger component is at least this many cycles/px (Nyquist is 0.5).
HIGH_BAND = 0.375

ImageSource = str | os.PathLike | ImageSet | Sequence[np.ndarray] | Sequence[str | os.PathLike]


def high_pass(image: np.ndarray) -> np.ndarray:
    """Image minus its 3x3 median-filtered version, float64, per channel (H x W or H x W x C).

    A median filter keeps edges and smooth shading but removes isolated, pixel-scale
    structure, so the residual is mostly the fine texture a generator's upsampling leaves.
    """
    pixels = np.asarray(image, dtype=np.float64)
    size = (3, 3) if pixels.ndim == 2 else (3, 3, 1)
    return pixels - median_filter(pixels, size=size, mode="reflect")


def image_spectrum(image: np.ndarray, color: str = "gray") -> np.ndarray:
    """log(1 + |FFT|) of an image's high-pass residual, DC at the centre (fftshift), H x W.

    The residual is in 8-bit units and the FFT is orthonormal, so white noise of standard
    deviation s gives about log(1 + s) at every frequency whatever the image size, and a
    flat image gives exactly 0. `color`: "gray" filters the BT.601 luma; "mean" filters
    each channel and averages their log spectra.
    """
    if color not in COLORS:
        raise InputError(f"color {color!r}: expected one of {', '.join(COLORS)}")
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 3 and color == "gray":
        pixels = pixels[..., :3] @ LUMA
    residual = high_pass(pixels)
    spectrum = np.fft.fft2(residual, axes=(0, 1), norm="ortho")
    logs = np.log1p(np.abs(np.fft.fftshift(spectrum, axes=(0, 1))))
    return logs if logs.ndim == 2 else logs.mean(axis=2)


def frequencies(size: int) -> np.ndarray:
    """Frequency (cycles/px) of each row or column of a `size`-point shifted spectrum."""
    return np.fft.fftshift(np.fft.fftfreq(size))


def _fit(image: np.ndarray, size: int, fit: str, name: str) -> np.ndarray:
    """Bring an image to size x size: centre crop, or Lanczos-resize the shorter side first."""
    if fit == "resize":
        image = resize_image(image, size)
    height, width = image.shape[:2]
    if min(height, width) < size:
        raise InputError(f"{name}: {width}x{height} px is smaller than the spectrum size {size} px "
                         "(choose a smaller size, or fit 'resize')")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


def _spread(count: int, limit: int) -> list[int]:
    """At most `limit` indices spread evenly over range(count), so a sorted folder is sampled throughout."""
    if count <= limit:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit).round()})


def _iter_images(images: ImageSource, max_images: int, split: str | None,
                 on_bad_image: str) -> tuple[int, Iterable[tuple[str, np.ndarray | None]]]:
    """(number selected, iterator of (name, uint8 pixels or None for a skipped file))."""
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images, split)
    if isinstance(images, ImageSet):
        chosen = _spread(len(images), max_images)
        return len(chosen), ((str(images.paths[i]), images[i]) for i in chosen)
    items = list(images)
    if not items:
        raise InputError("no images given for the spectrum (expected at least one)")
    chosen = _spread(len(items), max_images)

    def load(i: int) -> tuple[str, np.ndarray | None]:
        item = items[i]
        if not isinstance(item, (str, os.PathLike)):
            return f"image {i}", np.asarray(item)
        try:
            return str(item), read_image(item)
        except BadImageError as err:
            if on_bad_image == "error":
                raise
            log.warning("skipped %s", err)
            return str(item), None

    return len(chosen), (load(i) for i in chosen)


def average_spectrum(images: ImageSource, size: int | None = None, fit: str = "crop", max_images: int = 2000,
                     color: str = "gray", split: str | None = "test", on_bad_image: str = "skip",
                     progress: bool = False) -> np.ndarray:
    """Mean of `image_spectrum` over up to `max_images` images brought to one size x size square.

    `images`: a folder or manifest (with `split` for split layouts), an ImageSet, a list of
    paths, or a list of uint8 H x W x 3 arrays. More than `max_images` are subsampled evenly.
    `size` None takes the shorter side of the first image; `fit` "crop" centre-crops,
    "resize" Lanczos-resizes the shorter side to `size` and then centre-crops.
    """
    return _average_spectrum(images, size, fit, max_images, color, split, on_bad_image, progress)[0]


def _average_spectrum(images: ImageSource, size: int | None, fit: str, max_images: int, color: str,
                      split: str | None, on_bad_image: str, progress: bool) -> tuple[np.ndarray, int]:
    """(mean spectrum, number of images averaged)."""
    if fit not in FITS:
        raise InputError(f"fit {fit!r}: expected one of {', '.join(FITS)}")
    if color not in COLORS:
        raise InputError(f"color {color!r}: expected one of {', '.join(COLORS)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise InputError(f"on_bad_image {on_bad_image!r}: expected one of {', '.join(BAD_IMAGE_POLICIES)}")
    if max_images < 1 or (size is not None and size < 3):
        raise InputError(f"need max_images >= 1 and size >= 3 px, got {max_images} and {size}")
    count, stream = _iter_images(images, max_images, split, on_bad_image)
    total, used = None, 0
    for name, pixels in progress_bar(stream, total=count, desc="spectrum", unit="img", disable=not progress):
        if pixels is None:
            continue
        if size is None:
            size = min(pixels.shape[:2])
        spectrum = image_spectrum(_fit(pixels, size, fit, name), color)
        total = spectrum if total is None else total + spectrum
        used += 1
    if total is None:
        raise InputError(f"none of the {count} selected images could be read")
    return total / used, used


def _band_summary(spectrum: np.ndarray) -> dict[str, Any]:
    """Mean, high-band mean and strongest non-DC frequency of one shifted spectrum."""
    fy, fx = np.meshgrid(frequencies(spectrum.shape[0]), frequencies(spectrum.shape[1]), indexing="ij")
    high = np.maximum(np.abs(fx), np.abs(fy)) >= HIGH_BAND
    masked = np.where((fx == 0) & (fy == 0), -np.inf, spectrum)
    row, col = np.unravel_index(int(np.argmax(masked)), spectrum.shape)
    return {"mean": float(spectrum.mean()), "high_band_mean": float(spectrum[high].mean()),
            "peak": {"fx": float(fx[row, col]), "fy": float(fy[row, col]), "value": float(spectrum[row, col])}}


def summarize_spectra(real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """Summary numbers of a real/fake comparison: per set and for fake minus real."""
    diff = fake - real
    peak = np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape)
    freqs_y, freqs_x = frequencies(diff.shape[0]), frequencies(diff.shape[1])
    return {"high_band": f"max(|fx|, |fy|) >= {HIGH_BAND} cycles/px",
            "real": _band_summary(real), "fake": _band_summary(fake),
            "difference": {"mean": float(diff.mean()), "high_band_mean": _band_summary(diff)["high_band_mean"],
                           "largest": {"fx": float(freqs_x[peak[1]]), "fy": float(freqs_y[peak[0]]),
                                       "value": float(diff[peak])}}}


def _save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def plot_spectra(real: np.ndarray, fake: np.ndarray, path: str | os.PathLike, title: str | None = None,
                 labels: tuple[str, str] = ("real", "fake"), counts: tuple[int, int] | None = None) -> None:
    """Three panels (real, fake, fake minus real) with colour bars and frequency axes, saved as PNG/PDF/SVG."""
    from matplotlib.figure import Figure

    figure_format(path)
    size = real.shape[0]
    step = 1.0 / size
    freqs = frequencies(size)
    extent = (freqs[0] - step / 2, freqs[-1] + step / 2, freqs[0] - step / 2, freqs[-1] + step / 2)
    diff = fake - real
    # Real and fake share one colour scale so they can be compared by eye; the difference is centred on 0.
    low, high = float(min(real.min(), fake.min())), float(max(real.max(), fake.max()))
    bound = float(np.abs(diff).max()) or 1.0
    figure = Figure(figsize=(15, 4.6))
    named = [f"{label} (n={n})" for label, n in zip(labels, counts)] if counts else list(labels)
    panels = [(real, f"{named[0]}: mean spectrum", "magma", low, high, "log(1 + |FFT|)"),
              (fake, f"{named[1]}: mean spectrum", "magma", low, high, "log(1 + |FFT|)"),
              (diff, f"{labels[1]} minus {labels[0]}", "RdBu_r", -bound, bound, "difference of log(1 + |FFT|)")]
    for index, (values, name, cmap, vmin, vmax, unit) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        image = axes.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", extent=extent,
                            interpolation="nearest")
        axes.set(title=name, xlabel="horizontal frequency (cycles/px)", ylabel="vertical frequency (cycles/px)")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label=unit)
    figure.suptitle(title or f"Average high-pass spectra ({size}x{size} px)")
    figure.tight_layout()
    save_figure(figure, path)


def compare_spectra(real: ImageSource, fake: ImageSource, out: str | os.PathLike, size: int | None = None,
                    fit: str = "crop", max_images: int = 2000, color: str = "gray", split: str | None = "test",
                    on_bad_image: str = "skip", force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Average spectra of a real and a fake set; writes into `out` and returns the summary.

    Files: spectra.png (real, fake, difference), spectrum_real.npy, spectrum_fake.npy,
    spectrum_diff.npy and spectra.json (settings and summary numbers). The fake set uses
    the size the real set settled on. An existing spectra.json is refused unless `force`.
    """
    out = Path(out)
    if (out / "spectra.json").exists() and not force:
        raise InputError(f"{out}/spectra.json exists; pass --force to replace it or choose another --out")
    options = dict(fit=fit, max_images=max_images, color=color, split=split, on_bad_image=on_bad_image,
                   progress=progress)
    real_spectrum, n_real = _average_spectrum(real, size, **options)
    size = real_spectrum.shape[0]
    fake_spectrum, n_fake = _average_spectrum(fake, size, **options)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("real", real_spectrum), ("fake", fake_spectrum), ("diff", fake_spectrum - real_spectrum)):
        _save_array(out / f"spectrum_{name}.npy", array)
    plot_spectra(real_spectrum, fake_spectrum, out / "spectra.png", counts=(n_real, n_fake))
    summary = {"real": _describe(real), "fake": _describe(fake), "split": split, "n_real": n_real,
               "n_fake": n_fake, "size": size, "fit": fit, "color": color, "max_images": max_images,
               "spectrum": "log(1 + |FFT(image - median3x3(image))|): orthonormal FFT of the residual in "
                           "8-bit units, DC at the centre, frequencies in cycles/px",
               "summary": summarize_spectra(real_spectrum, fake_spectrum)}
    write_json(out / "spectra.json", summary)
    return {**summary, "out": str(out)}


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"{len(source)} images passed in"
