"""SIGKILL at seeded random moments, then resume (issue 21 item 3), through the real `patchscope` script.

Fast subset (3 kills each) runs in `make test`; the full matrix (>= 10 kills each) is marked `faults` and runs
in `make test-all` / `make test-faults`. Every run: every file parses, no temporary file left, the final
outputs equal an uninterrupted run's bit for bit (CPU fp32).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import check_files, kill_and_resume, run_clean, safetensors_equal, tree_bytes
from tests.tiny_models import save_tiny_pgan

FULL_KILLS = 10


def _sample_args(generator: Path, out: Path) -> list[str]:
    return ["sample", str(generator), "--out", str(out), "--train", "24", "--test", "8", "--batch-size", "2",
            "--device", "cpu"]


def _check_sample(tmp_path: Path, kills: int, seed: int) -> dict:
    generator = save_tiny_pgan(tmp_path / "pgan.pt", seed=0)
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(_sample_args(generator, clean))
    args = _sample_args(generator, faulty)
    report = kill_and_resume(args, lambda: args, kills, seed, clean_s)
    checked = check_files(faulty)
    pngs = tree_bytes(faulty, (".png",))
    assert sorted(pngs) == sorted(tree_bytes(clean, (".png",))), "duplicated or missing sample"
    assert len(pngs) == 32
    assert pngs == tree_bytes(clean, (".png",))
    return {"kills": report.kills, "checked": checked}


def _train_args(data: Path, config: Path, out: Path) -> list[str]:
    return ["train", "--config", str(config), "--real", str(data / "real"), "--fake", str(data / "fake"),
            "--out", str(out), "--load-size", "32", "--crop-size", "32", "--batch-size", "16",
            "--max-epochs", "3", "--device", "cpu", "--precision", "fp32", "--seed", "0"]


def _check_train(tmp_path: Path, data: Path, kills: int, seed: int) -> dict:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: xception_block1\n  init: kaiming\n")
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(_train_args(data, config, clean))
    args = _train_args(data, config, faulty)

    def resume() -> list[str]:
        # Killed before the run folder held a resume state: start again (the folder is the command's own).
        if not (faulty / "resume.pt").exists():
            import shutil

            shutil.rmtree(faulty, ignore_errors=True)
            return args
        return args + ["--resume"]

    report = kill_and_resume(args, resume, kills, seed, clean_s)
    checked = check_files(faulty)
    for name in ("last.safetensors",):
        assert safetensors_equal(clean / name, faulty / name), f"{name} differs from the uninterrupted run"
    return {"kills": report.kills, "checked": checked}


def test_sample_survives_sigkill_fast(tmp_path):
    _check_sample(tmp_path, kills=3, seed=1)


def test_train_survives_sigkill_fast(tmp_path, builtin_dataset):
    _check_train(tmp_path, builtin_dataset, kills=3, seed=1)


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_sample_survives_ten_sigkills(tmp_path, seed):
    _check_sample(tmp_path, kills=FULL_KILLS, seed=seed)


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_train_survives_ten_sigkills(tmp_path, builtin_dataset, seed):
    _check_train(tmp_path, builtin_dataset, kills=FULL_KILLS, seed=seed)


GAN = ["--resolution", "16", "--latent-dim", "8", "--fmap-base", "64", "--fmap-max", "8", "--batch-size", "4",
       "--scale-images", "24", "--fade-images", "12", "--gp-every", "2", "--log-images", "8",
       "--snapshot-images", "20", "--ema-half-life", "16", "--no-channels-last", "--device", "cpu", "--seed", "0"]


def _tensors_equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return True  # settings and paths may name the run folder


def _check_train_gan(tmp_path: Path, kills: int, seed: int) -> dict:
    import shutil

    import torch
    from PIL import Image

    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, crop in enumerate(random_crops(builtin_photos(), 24, 16, seed=0)):
        Image.fromarray(crop).save(crops / f"{i:03d}.png")
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(["train-gan", "--images", str(crops), "--out", str(clean), *GAN])
    args = ["train-gan", "--images", str(crops), "--out", str(faulty), *GAN]

    def resume() -> list[str]:
        if not (faulty / "resume.pt").exists():
            shutil.rmtree(faulty, ignore_errors=True)
            return args
        return args + ["--resume"]

    report = kill_and_resume(args, resume, kills, seed, clean_s)
    checked = check_files(faulty)
    names = sorted(p.name for p in clean.glob("generator*.pt"))
    assert names == sorted(p.name for p in faulty.glob("generator*.pt"))
    for name in names:
        a = torch.load(clean / name, map_location="cpu", weights_only=True)
        b = torch.load(faulty / name, map_location="cpu", weights_only=True)
        assert _tensors_equal(a, b), f"{name} differs from the uninterrupted run"
    return {"kills": report.kills, "checked": checked}


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_train_gan_survives_ten_sigkills(tmp_path, seed):
    _check_train_gan(tmp_path, kills=FULL_KILLS, seed=seed)


def _check_exaggerate(tmp_path: Path, kills: int, seed: int) -> dict:
    import torch

    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.generators.pgan.zoo import save_pgan_zoo
    from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    save_classifier(tmp_path / "classifier" / "best", brightness_classifier(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})

    def args(out: Path) -> list[str]:
        return ["exaggerate", "--generator", str(tmp_path / "pgan.pt"), "--classifier", str(tmp_path / "classifier"),
                "--out", str(out), "--steps", "30", "--batch-size", "4", "--eval-n", "8", "--grid-rows", "2",
                "--lam", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0"]

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(args(clean))

    def resume() -> list[str]:
        # A shift saved: re-score it (--resume); none yet: fit again (--force claims a folder cut short).
        return args(faulty) + (["--resume"] if (faulty / "shift.pt").exists() else ["--force"])

    report = kill_and_resume(args(faulty), resume, kills, seed, clean_s)
    checked = check_files(faulty)
    a = torch.load(clean / "shift.pt", map_location="cpu", weights_only=True)
    b = torch.load(faulty / "shift.pt", map_location="cpu", weights_only=True)
    assert _tensors_equal(a, b), "shift.pt differs from the uninterrupted run"
    return {"kills": report.kills, "checked": checked}


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_exaggerate_survives_ten_sigkills(tmp_path, seed):
    _check_exaggerate(tmp_path, kills=FULL_KILLS, seed=seed)


def _check_invert(tmp_path: Path, kills: int, seed: int) -> dict:
    import torch

    from tests.tiny_models import save_tiny_pgan as save

    images = tmp_path / "images"
    images.mkdir()
    generator = save(tmp_path / "pgan.pt", seed=0)
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")

    def args(out: Path) -> list[str]:
        return ["invert", "--generator", str(generator), "--images", str(images), "--out", str(out), "--steps", "40",
                "--lambda-lpips", "0", "--batch-size", "2", "--device", "cpu", "--seed", "0"]

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(args(clean))

    def resume() -> list[str]:
        return args(faulty) + (["--resume"] if faulty.exists() else [])

    report = kill_and_resume(args(faulty), resume, kills, seed, clean_s)
    checked = check_files(faulty)
    assert tree_bytes(faulty, (".png",)) == tree_bytes(clean, (".png",)), "inverted images differ or are missing"
    for p in clean.rglob("*.pt"):
        a = torch.load(p, map_location="cpu", weights_only=True)
        b = torch.load(faulty / p.relative_to(clean), map_location="cpu", weights_only=True)
        assert _tensors_equal(a, b), f"{p.name} differs from the uninterrupted run"
    return {"kills": report.kills, "checked": checked}


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_invert_survives_ten_sigkills(tmp_path, seed):
    _check_invert(tmp_path, kills=FULL_KILLS, seed=seed)


def _check_finetune(tmp_path: Path, kills: int, seed: int) -> dict:
    import shutil

    from PIL import Image

    from patchscope.forensics.builtin_images import builtin_photos, random_crops
    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.generators.io.safe_pickle import load_torch
    from patchscope.generators.pgan.zoo import save_pgan_zoo
    from tests.attacks.test_finetune import detector
    from tests.tiny_models import RESOLUTION, tiny_pgan

    (tmp_path / "real").mkdir()
    for i, crop in enumerate(random_crops(builtin_photos(), 16, RESOLUTION, seed=0)):
        Image.fromarray(crop).save(tmp_path / "real" / f"{i:03d}.png")
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    save_classifier(tmp_path / "classifier" / "best", detector(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})

    def args(out: Path) -> list[str]:
        return ["finetune", "--generator", str(tmp_path / "pgan.pt"), "--classifier", str(tmp_path / "classifier"),
                "--real", str(tmp_path / "real"), "--out", str(out), "--steps", "12", "--batch-size", "4",
                "--classifier-weight", "10", "--ema-beta", "0.5", "--checkpoint-every", "2", "--log-every", "2",
                "--eval-n", "4", "--compare-n", "4", "--grid-rows", "2", "--lpips-random", "--device", "cpu",
                "--precision", "fp32"]

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(args(clean))

    def resume() -> list[str]:
        if not (faulty / "config.yaml").exists():
            shutil.rmtree(faulty, ignore_errors=True)
            return args(faulty)
        return args(faulty) + ["--resume"]

    report = kill_and_resume(args(faulty), resume, kills, seed, clean_s)
    checked = check_files(faulty)
    a, b = load_torch(clean / "generator.pt"), load_torch(faulty / "generator.pt")
    for name in ("netG", "netD", "avgG"):
        assert _tensors_equal(a[name], b[name]), f"generator.pt {name} differs from the uninterrupted run"
    return {"kills": report.kills, "checked": checked}


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_finetune_survives_ten_sigkills(tmp_path, seed):
    _check_finetune(tmp_path, kills=FULL_KILLS, seed=seed)


def _check_demo(tmp_path: Path, kills: int, seed: int) -> dict:
    import json

    config = tmp_path / "pinned.yaml"
    config.write_text("device: cpu\nprecision: fp32\n")  # as tests/analysis/test_demo.py pins it

    def args(out: Path) -> list[str]:
        return ["demo", "--out", str(out), "--quick", "--config", str(config)]

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean_s = run_clean(args(clean), timeout=600)
    cached_s = run_clean(args(clean), timeout=600)  # a restart that finds every stage done
    report = kill_and_resume(args(faulty), lambda: args(faulty), kills, seed, clean_s, timeout=600,
                             skips_done_s=cached_s)
    assert report.killed_alive >= kills - 2, f"only {report.killed_alive} of {kills} kills found demo running"
    checked = check_files(faulty)
    assert (faulty / "report.html").is_file()
    a = json.loads((clean / "demo_summary.json").read_text())
    b = json.loads((faulty / "demo_summary.json").read_text())
    a.pop("stages"), b.pop("stages")  # each stage's wall time
    assert a == b, "demo_summary.json differs from the uninterrupted quick run's"
    return {"kills": report.kills, "checked": checked}


@pytest.mark.faults
@pytest.mark.parametrize("seed", [11])
def test_demo_quick_survives_ten_sigkills(tmp_path, seed):
    _check_demo(tmp_path, kills=FULL_KILLS, seed=seed)
