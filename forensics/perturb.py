"""Test-time perturbations of uint8 images (JPEG re-compression, Gaussian blur) and an image set that applies one.

Used by `analysis.robustness` (and `patchscope eval --perturb`) for Wang et al.'s robustness sweeps.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from patchscope.common.errors import InputError

PERTURBATION_KINDS = ("jpeg", "blur")
JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
# scipy's default: the kernel is cut at 4 sigma; also what Wang et al.'s augmentation used.
BLUR_TRUNCATE = 4.0
_SPEC_FORMAT = "expected KIND:LEVEL[,LEVEL...], e.g. jpeg:95,75,50 (quality 1-100) or blur:1,2 (sigma >= 0, px)"


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {image.dtype} of shape {image.shape}")
    return image


def jpeg(image: np.ndarray, quality: int, subsampling: str = "4:2:0") -> np.ndarray:
    """Encode as JPEG at `quality` (1-100) in memory with Pillow and decode again; uint8 H x W x 3.

    The default chroma subsampling 4:2:0 is Pillow's and libjpeg's default, as in Wang et al.'s
    pipeline; it blurs colour even at quality 100, so only "4:4:4" at 100 is close to lossless.
    """
    image = _check_image(image)
    if not 1 <= int(quality) <= 100 or int(quality) != quality:
        raise ValueError(f"JPEG quality must be an integer from 1 to 100, got {quality!r}")
    if subsampling not in JPEG_SUBSAMPLING:
        raise ValueError(f"JPEG subsampling must be one of {', '.join(JPEG_SUBSAMPLING)}, got {subsampling!r}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=int(quality),
                                                      subsampling=JPEG_SUBSAMPLING[subsampling])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel with standard deviation `sigma` px; sigma 0 returns an unchanged copy.

    Kernel: the sampled, normalised Gaussian cut at BLUR_TRUNCATE sigma (radius round(4 sigma)),
    applied separably with mirrored borders (scipy.ndimage.gaussian_filter, mode "reflect");
    the result is rounded to the nearest integer and clipped to 0..255.
    """
    image = _check_image(image)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return image.copy()
    # float64 throughout: float32 accumulation could shift a value across a rounding boundary.
    blurred = gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect",
                              truncate=BLUR_TRUNCATE)
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one level: JPEG quality for `jpeg`, sigma in pixels for `blur`."""

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; expected one of {', '.join(PERTURBATION_KINDS)}")
        problem = _level_problem(self.kind, float(self.level))
        if problem:
            raise ValueError(f"{self.kind} level {self.level!r}: {problem}")

    @property
    def name(self) -> str:
        """`jpeg:75`, `blur:1.5`: the spec that parses back to this perturbation."""
        return f"{self.kind}:{_format_level(self.level)}"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.kind == "jpeg":
            return jpeg(image, int(self.level))
        return blur(image, float(self.level))


def _format_level(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else repr(float(level))


def _level_problem(kind: str, value: float) -> str | None:
    """Why `value` is not a valid level of `kind`, or None."""
    if kind == "jpeg" and not (value.is_integer() and 1 <= value <= 100):
        return "JPEG quality must be an integer from 1 to 100"
    if kind == "blur" and not (math.isfinite(value) and value >= 0):
        return "blur sigma must be a finite number >= 0 (px)"
    return None


def _parse_level(kind: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"perturbation {spec!r}: level {text!r} is not a number ({_SPEC_FORMAT})") from None
    problem = _level_problem(kind, value)
    if problem:
        raise InputError(f"perturbation {spec!r}: level {text!r}: {problem}")
    return value


def parse_perturbation(spec: str) -> list[Perturbation]:
    """`jpeg:95,75,50` -> one Perturbation per level, in the order given; a bad spec is one InputError line."""
    kind, colon, levels = str(spec).partition(":")
    kind = kind.strip().lower()
    if not colon or not kind:
        raise InputError(f"perturbation {spec!r}: {_SPEC_FORMAT}")
    if kind not in PERTURBATION_KINDS:
        raise InputError(f"perturbation {spec!r}: unknown kind {kind!r}; expected one of "
                         f"{', '.join(PERTURBATION_KINDS)}")
    texts = [text.strip() for text in levels.split(",")]
    if not levels.strip() or "" in texts:
        raise InputError(f"perturbation {spec!r}: empty level; {_SPEC_FORMAT}")
    values = [_parse_level(kind, text, spec) for text in texts]
    repeated = sorted({_format_level(v) for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(f"perturbation {spec!r}: level {', '.join(repeated)} given more than once")
    return [Perturbation(kind, value) for value in values]


def parse_perturbations(specs: list[str] | tuple[str, ...]) -> list[Perturbation]:
    """Several specs (one per kind, as `--perturb` repeats) -> all their perturbations; repeats are refused."""
    perturbations = [p for spec in specs for p in parse_perturbation(spec)]
    names = [p.name for p in perturbations]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"perturbation {', '.join(repeated)} given more than once")
    return perturbations


class PerturbedImageSet:
    """An `ImageSet` seen through one perturbation: item i is `perturbation(base[i])`, computed on access.

    Same interface as `forensics.data.ImageSet` (len, [i], paths, sizes, cached, skipped), so
    `RealFakeDataset(PerturbedImageSet(real, p), PerturbedImageSet(fake, p), ...)` works unchanged.
    The perturbation acts on the image as loaded (after the load-time resize, before any crop).
    Items are deterministic: JPEG and blur involve no randomness.
    """

    def __init__(self, base, perturbation: Perturbation):
        self.base, self.perturbation = base, perturbation

    @property
    def paths(self) -> list[Path]:
        return self.base.paths

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self.base.sizes  # neither JPEG nor blur changes an image's size

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        return self.base.skipped

    @property
    def cached(self) -> bool:
        return self.base.cached

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 H x W x 3, a fresh array."""
        return self.perturbation(self.base[index])
