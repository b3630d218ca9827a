"""train-gan killed while it writes a snapshot: resume.pt alone is what a resume reads, so a kill before any of
the snapshot's writes (generator.pt, the scale's file, resume.pt) or a log line resumes to an uninterrupted run's bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from patchscope.generators.training import trainer
from patchscope.generators.training.trainer import GANTrainConfig, train_gan

TINY = dict(resolution=16, latent_dim=8, fmap_base=64, fmap_max=8, batch_size=4, scale_images=24,
            fade_images=12, gp_every=2, log_images=8, snapshot_images=20, ema_half_life=16, channels_last=False)
WRITES = ("save_pgan_zoo", "replace_atomically", "_append_line")  # every file the trainer writes goes through these


# What the run below writes, in order: a log line every 8 images, a snapshot every 20 and at each scale's end (24).
SNAPSHOT, END_OF_SCALE = ("generator.pt", "resume.pt"), ("generator.pt", "generator_{}px.pt", "resume.pt")
WRITTEN = tuple(name.format(px) for px in (4, 8) for name in (
    "metrics.jsonl", "metrics.jsonl", *SNAPSHOT, "metrics.jsonl", *END_OF_SCALE)) + tuple(name.format(16) for name in (
    "metrics.jsonl", *SNAPSHOT, "metrics.jsonl", "metrics.jsonl", *END_OF_SCALE))


class Killed(BaseException):
    """The process dying at a chosen moment."""


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    folder = tmp_path_factory.mktemp("crops")
    for i, crop in enumerate(random_crops(builtin_photos(), 24, 16, seed=0)):
        Image.fromarray(crop).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(crops: Path) -> GANTrainConfig:
    return GANTrainConfig(images=str(crops), out="run", **TINY)  # relative: every run records the same settings


def instrument(monkeypatch, kill_at: int | None = None) -> list[str]:
    """Name every write of a run in order ("generator_8px.pt", "metrics.jsonl"...); raise Killed before `kill_at`."""
    done: list[str] = []

    def wrap(name, real):
        def write(*args, **kwargs):
            target = Path(args[1] if name == "save_pgan_zoo" else args[0]).name
            if len(done) == kill_at:
                raise Killed(f"before writing {target}")
            done.append(target)
            return real(*args, **kwargs)
        return write

    for name in WRITES:
        monkeypatch.setattr(trainer, name, wrap(name, getattr(trainer, name)))
    return done


def outcome(run: Path) -> dict[str, object]:
    """The run's generator files byte for byte, its resume state and its log but for the training time."""
    resume = torch.load(run / "resume.pt", weights_only=True)
    resume["progress"].pop("seconds")
    log = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
           for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"files": {p.name: p.read_bytes() for p in sorted(run.glob("generator*.pt"))}, "resume": resume, "log": log}


def same(a: object, b: object) -> bool:
    """Equality of nested states, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def straight(crops, tmp_path_factory) -> tuple[dict[str, object], list[str]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("straight"))
        writes = instrument(patch)
        train_gan(config(crops))
        return outcome(Path("run")), writes


def test_a_run_writes_log_lines_and_snapshots_in_this_order(straight) -> None:
    assert straight[1] == list(WRITTEN)


@pytest.mark.parametrize("kill_at", range(len(WRITTEN)), ids=[f"{i:02d}-{name}" for i, name in enumerate(WRITTEN)])
def test_a_kill_before_any_write_resumes_to_the_bytes_of_an_uninterrupted_run(
        crops, tmp_path, monkeypatch, straight, kill_at) -> None:
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        instrument(patch, kill_at)
        with pytest.raises(Killed):
            train_gan(config(crops))
    assert train_gan(config(crops), resume=True)["finished"]
    assert same(outcome(Path("run")), straight[0])
