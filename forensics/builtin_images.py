"""Built-in real photographs (the samples shipped inside scikit-image and scikit-learn) cut into crops.

Used by the demo and the tests: real camera images with no download, written as PNG folders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from patchscope.common.atomic import write_json
from patchscope.common.crops import cut_crop, draw_crop

# Colour camera photographs bundled in the scikit-image wheel (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina")
SPLITS = ("train", "val", "test")


def builtin_photos() -> dict[str, np.ndarray]:
    """name -> uint8 H x W x 3 photograph."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        photos[Path(filename).stem] = image
    return {name: np.ascontiguousarray(img[..., :3]) for name, img in photos.items()}


def random_crops(photos: dict[str, np.ndarray], n: int, size: int, seed: int) -> list[np.ndarray]:
    """`n` square crops of random position and scale (1x to 3x `size`), Lanczos-resized to `size`."""
    rng = np.random.default_rng(seed)
    images = list(photos.values())
    crops = []
    for _ in range(n):  # each crop from a random photo, by the recipe `prepare --random-crops` shares
        photo = images[rng.integers(len(images))]
        crops.append(cut_crop(photo, draw_crop(rng, *photo.shape[:2], size), size))
    return crops


def resample_like_upsampler(image: np.ndarray) -> np.ndarray:
    """Halve the resolution, then double it with nearest-neighbour upsampling.

    A stand-in for the 2x upsampling traces a generator leaves: the content stays, while
    every 2x2 block becomes constant — a local texture a patch classifier can find.
    """
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((width // 2, height // 2), Image.BOX)
    return np.asarray(small.resize((width, height), Image.NEAREST))


def write_builtin_dataset(root: str | Path, counts: dict[str, int], size: int, seed: int = 0) -> Path:
    """Write `root/real/<split>/*.png` crops and `root/fake/<split>/*.png` resampled crops.

    Real and fake come from different crops (fakes never share a crop with a real image);
    both are saved as lossless PNG at the same size, so format cannot give them away.
    Returns `root`; a `dataset.json` records what was written.
    """
    root = Path(root)
    photos = builtin_photos()
    for offset, split in enumerate(SPLITS):
        n = counts.get(split, 0)
        crops = random_crops(photos, 2 * n, size, seed=seed * 1000 + offset)
        for kind, images in (("real", crops[:n]), ("fake", [resample_like_upsampler(c) for c in crops[n:]])):
            folder = root / kind / split
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{i:05d}.png")
    write_json(root / "dataset.json", {"photos": sorted(photos), "counts": counts, "size": size, "seed": seed,
                                       "fake": "resampled: box 2x down, nearest 2x up"})
    return root


def write_builtin_reals(root: str | Path, counts: dict[str, int], size: int, seed: int = 0) -> Path:
    """Write only the real crops, `root/<split>/*.png`: the same images as `write_builtin_dataset`'s
    real half for the same seed (the first n crops of each split's stream), for a generator to fake.
    Returns `root`; a `dataset.json` records what was written.
    """
    root = Path(root)
    photos = builtin_photos()
    for offset, split in enumerate(SPLITS):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(random_crops(photos, counts.get(split, 0), size, seed=seed * 1000 + offset)):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    write_json(root / "dataset.json", {"photos": sorted(photos), "counts": counts, "size": size, "seed": seed})
    return root
