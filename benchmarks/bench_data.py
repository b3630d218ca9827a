"""Data loading alone, images/s: decoding PNG files and Lanczos-resizing them every epoch, against reading the
prepared image store (`forensics.store`) and the in-memory cache; then cropping on the host against on the device.

Run: `python benchmarks/bench_data.py [--images 512] [--source-size 128] [--load-size 299] [--workers 0,2]
[--threads 1] [--device cpu|cuda]`.
Writes random PNGs to a temporary folder, then prints one row per (path, workers); nothing here is asserted.
Each row: one training epoch through `make_loader` (crop, flip, to float tensors, batch 32), no model. The
"crop on host/device" rows (memory cache) go on to the model's input on --device: host batches are copied there
as float32 crops, device batches as uint8 images and cropped there (`forensics.device_crop`); on CUDA the figure
includes the copies and waits for the last crop.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchscope.forensics.data import ImageSet, RealFakeDataset, make_loader
from patchscope.forensics.device_crop import to_device_batch


def write_pngs(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """Smooth random images (noise PNGs would not compress like real ones and decode slower than photos)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-8, 9, (size, size, 3)), 0, 255)
        path = folder / f"{i:05d}.png"
        Image.fromarray(noisy.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def epoch_rate(real: ImageSet, fake: ImageSet, crop_size: int, workers: int, batch_size: int = 32,
               crop_on: str | None = None, device: torch.device | None = None) -> float:
    """Images/s of one epoch; with `crop_on`, each batch is taken on to channels_last float32 input on `device`."""
    dataset = RealFakeDataset(real, fake, crop_size=crop_size, train=True, seed=0)
    device_type = device.type if crop_on is not None else "cpu"
    loader = make_loader(dataset, batch_size, train=True, seed=0, workers=workers, device_type=device_type,
                         crop_on=crop_on or "host")
    start, seen = time.perf_counter(), 0
    for batch in loader:
        if crop_on is not None:
            x, _, _ = to_device_batch(batch, device, torch.channels_last)
        else:
            x = batch[0]
        seen += len(x)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images in all, half real and half fake")
    parser.add_argument("--source-size", type=int, default=128, help="side of the PNG files")
    parser.add_argument("--load-size", type=int, default=299)
    parser.add_argument("--crop-size", type=int, default=299)
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to try")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process (collate)  [default: torch's]")
    parser.add_argument("--device", default="cpu", help="where the crop-on rows put the model's input: cpu | cuda[:N]")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each crop-on row (the best one counts)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        half = args.images // 2
        sources = [write_pngs(root / kind, half, args.source_size, seed) for seed, kind in enumerate(("real", "fake"))]
        print(f"{args.images} PNGs of {args.source_size} px, load size {args.load_size}, crop {args.crop_size}, "
              f"{torch.get_num_threads()} torch thread(s), crop-on rows to {device}")
        print(f"{'path':<44} {'workers':>7} {'img/s':>9}")

        def row(name: str, count: int, seconds: float, worker_count: int | str = "-") -> None:
            print(f"{name:<44} {worker_count:>7} {count / seconds:>9.1f}")

        def build(**options) -> tuple[list[ImageSet], float]:
            start = time.perf_counter()
            sets = [ImageSet(paths, load_size=args.load_size, **options) for paths in sources]
            return sets, time.perf_counter() - start

        lazy, seconds = build(cache=False, workers=max(workers))
        row("files: load-time check (decode)", args.images, seconds, max(workers))
        for w in workers:
            row("files: epoch (decode + resize every image)", 1, 1 / epoch_rate(*lazy, args.crop_size, w), w)
        cached, seconds = build(cache=True, workers=max(workers))
        row("memory cache: build (decode + resize)", args.images, seconds, max(workers))
        row("memory cache: epoch", 1, 1 / epoch_rate(*cached, args.crop_size, 0), 0)
        for w in workers:
            for crop_on in ("host", "device"):
                rate = max(epoch_rate(*cached, args.crop_size, w, crop_on=crop_on, device=device)
                           for _ in range(args.epochs))
                row(f"crop on {crop_on}: cache -> {device.type} input", 1, 1 / rate, w)
        store = root / "store"
        _, seconds = build(cache=False, workers=max(workers), store=store)
        row("store: first build (decode + resize + write)", args.images, seconds, max(workers))
        stored, seconds = build(cache=False, workers=0, store=store)
        row("store: reopen (fingerprint files, no decode)", args.images, seconds, 0)
        for w in workers:
            row("store: epoch (memory-mapped, no decode)", 1, 1 / epoch_rate(*stored, args.crop_size, w), w)


if __name__ == "__main__":
    main()
