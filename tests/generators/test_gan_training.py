"""The small progressive GAN trainer: WGAN-GP losses on hand-checkable critics, the fade-in and batch
schedules, runs that save zoo checkpoints `load_generator` reads back, exact resume, and input errors."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.common.errors import InputError
from patchscope.generators import CheckpointError, load_generator
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.pgan.zoo import PGANZooGenerator, build_pgan_zoo
from patchscope.generators.training.growing import GrowingGAN
from patchscope.generators.training.images import TrainingImages, TrainingInputError
from patchscope.generators.training.losses import critic_loss, drift_penalty, gradient_penalty, interpolate
from patchscope.generators.training.schedule import batch_indices, fade_alpha, scale_depths
from patchscope.generators.training.trainer import GANTrainConfig, GANTrainer, LossMeter, train_gan

TINY = dict(resolution=16, latent_dim=8, fmap_base=64, fmap_max=8, batch_size=4, scale_images=24,
            fade_images=12, gp_every=2, log_images=8, snapshot_images=20, ema_half_life=16, channels_last=False)


@pytest.fixture(autouse=True)
def one_thread():
    """These networks hold a few thousand weights: a second thread only adds a barrier to every op,
    which costs ten times the run on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """24 real photo crops, 16 px PNGs, two folders deep (the reader searches recursively)."""
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    folder = tmp_path_factory.mktemp("crops")
    for i, crop in enumerate(random_crops(builtin_photos(), 24, 16, seed=0)):
        (folder / f"part{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(crop).save(folder / f"part{i % 2}" / f"{i:03d}.png")
    return folder


def _config(crops: Path, out: Path, **changes) -> GANTrainConfig:
    return GANTrainConfig(images=str(crops), out=str(out), **{**TINY, **changes})


def _states(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_torch(run / "generator.pt")
    return {name: checkpoint[name] for name in ("netG", "netD", "avgG")}


def _log(run: Path, drop: tuple[str, ...] = ("seconds", "images_per_s")) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


# --- losses ---------------------------------------------------------------------------------

def _linear_critic(weight: torch.Tensor):
    return lambda x: (x.flatten(1) * weight).sum(dim=1, keepdim=True)


def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm_minus_one_squared() -> None:
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    mix = torch.tensor([0.0, 0.3, 1.0])
    weight = torch.full((4,), 1.0, requires_grad=True)  # norm 2 -> penalty (2 - 1)^2 = 1
    penalty = gradient_penalty(_linear_critic(weight), real, fake, mix)
    torch.testing.assert_close(penalty, torch.ones(3))
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w| = w when |w| = 2: the penalty trains the critic
    penalty.mean().backward()
    torch.testing.assert_close(weight.grad, torch.ones(4))
    unit = torch.full((4,), 0.5)  # a 1-Lipschitz critic pays nothing
    torch.testing.assert_close(gradient_penalty(_linear_critic(unit), real, fake, mix), torch.zeros(3))


def test_gradient_penalty_is_taken_between_real_and_fake_weighted_by_mix() -> None:
    # D(x) = |x|^2 / 2 has gradient x: the penalty measures the interpolated point itself.
    real, fake = torch.full((1, 1, 1, 4), 2.0), torch.zeros(1, 1, 1, 4)
    critic = lambda x: 0.5 * x.square().flatten(1).sum(dim=1, keepdim=True)  # noqa: E731
    # mix 0.25 of the real image: the point is 0.5 everywhere, norm 1, penalty 0 (the other way: 4)
    torch.testing.assert_close(gradient_penalty(critic, real, fake, torch.tensor([0.25])), torch.zeros(1))
    torch.testing.assert_close(interpolate(real, fake, torch.tensor([0.25])), torch.full((1, 1, 1, 4), 0.5))


def test_critic_loss_adds_wasserstein_gap_penalty_and_drift() -> None:
    weight = torch.tensor([2.0, 0.0, 0.0, 0.0])  # norm 2: penalty 1 everywhere
    real = torch.tensor([1.0, -2.0, 3.0])[:, None, None, None] * torch.tensor([1.0, 0, 0, 0]).reshape(1, 1, 1, 4)
    fake = torch.tensor([0.5, 0.5, 2.0])[:, None, None, None] * torch.tensor([1.0, 0, 0, 0]).reshape(1, 1, 1, 4)
    loss = critic_loss(_linear_critic(weight), real, fake, torch.rand(3))
    real_scores, fake_scores = torch.tensor([2.0, -4.0, 6.0]), torch.tensor([1.0, 1.0, 4.0])
    drift = real_scores.square().mean()  # 56 / 3
    expected = fake_scores.mean() - real_scores.mean() + 10.0 * 1.0 + 0.001 * drift
    torch.testing.assert_close(loss.total, expected)
    torch.testing.assert_close(loss.drift, drift)
    torch.testing.assert_close(loss.parts()["wasserstein"], real_scores.mean() - fake_scores.mean())


def test_critic_loss_without_penalty_weight_skips_the_penalty() -> None:
    weight = torch.tensor([2.0, 0.0, 0.0, 0.0])
    real, fake = torch.ones(2, 1, 1, 4), torch.zeros(2, 1, 1, 4)
    loss = critic_loss(_linear_critic(weight), real, fake, torch.rand(2), lambda_gp=0.0)
    assert loss.penalty is None and "gradient_penalty" not in loss.parts()
    torch.testing.assert_close(loss.total, torch.tensor(0.0 - 2.0 + 0.001 * 4.0))


def test_drift_penalty_is_the_squared_real_score() -> None:
    scores = torch.tensor([[1.5], [-2.0], [0.0]])
    torch.testing.assert_close(drift_penalty(scores), torch.tensor([2.25, 4.0, 0.0]))


# --- schedules and growth -------------------------------------------------------------------

def test_alpha_fades_linearly_from_one_to_zero_over_the_fade_of_each_new_scale() -> None:
    assert [fade_alpha(1, seen, 100) for seen in (0, 25, 50, 100, 150)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert fade_alpha(2, 40, 80) == 0.5
    assert fade_alpha(0, 0, 100) == 0.0  # the first scale has nothing to fade from
    assert fade_alpha(3, 0, 0) == 0.0


def test_batches_walk_through_shuffled_epochs_covering_every_image_once() -> None:
    n, batch = 10, 4
    stream = torch.cat([batch_indices(n, batch, step, seed=3, scale=1) for step in range(5)])
    assert sorted(stream[:10].tolist()) == list(range(10))  # epoch 0, across the step-2 boundary
    assert sorted(stream[10:20].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])  # each epoch has its own order
    assert not torch.equal(batch_indices(n, batch, 0, 3, 1), batch_indices(n, batch, 0, 4, 1))


def test_depths_follow_the_karras_rule_and_give_the_zoo_celebahq_depths() -> None:
    assert scale_depths(1024, 16384, 512) == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    assert scale_depths(32, 1024, 64) == [64, 64, 64, 32]


def test_grown_networks_have_the_layout_of_networks_built_at_full_size() -> None:
    gan = GrowingGAN([8, 8, 4], latent_dim=6, seed=0)
    gan.grow()
    gan.grow()
    generator, discriminator = build_pgan_zoo(16, 6, 8, [8, 4])
    for grown, built in ((gan.generator, generator), (gan.discriminator, discriminator)):
        assert [(k, v.shape) for k, v in grown.state_dict().items()] == \
               [(k, v.shape) for k, v in built.state_dict().items()]
    assert gan.resolution == 16 and gan.generator(torch.randn(2, 6)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="final scale"):
        gan.grow()


# --- runs -----------------------------------------------------------------------------------

def test_tiny_run_saves_a_zoo_generator_that_reads_back_with_identical_samples(crops: Path, tmp_path: Path) -> None:
    trainer = GANTrainer(_config(crops, tmp_path / "run"))
    summary = trainer.run()
    assert summary["finished"] and summary["resolution"] == 16 and summary["images"] == 3 * 24
    generator = load_generator(tmp_path / "run" / "generator.pt")
    assert isinstance(generator, PGANZooGenerator) and generator.format == "pgan_zoo"
    assert (generator.resolution, generator.latent_dim, generator.alpha) == (16, 8, 0.0)
    assert generator.discriminator is not None
    trained = trainer.gan.average
    for key, value in trained.state_dict().items():
        assert torch.equal(generator.state_dict()[key], value), key
    z = generator.sample_latents(6, seed=1)
    with torch.no_grad():
        assert torch.equal(generator(z), trained(z))
        # avgG and netG are different networks, and training moved the generator
        assert not torch.equal(load_generator(tmp_path / "run" / "generator.pt", use_avg=False)(z), trained(z))
    for resolution in (4, 8, 16):  # each scale's end is kept, readable at its own size
        assert load_generator(tmp_path / "run" / f"generator_{resolution}px.pt").resolution == resolution
    log = _log(tmp_path / "run")
    assert [line["images"] for line in log] == [8, 16, 24, 32, 40, 48, 56, 64, 72]
    assert [line["resolution"] for line in log] == [4] * 3 + [8] * 3 + [16] * 3
    assert all(np.isfinite([line["loss_d"], line["loss_g"], line["gradient_penalty"]]).all() for line in log)
    # the logged alpha is that of the interval's last step: 1 - 4/12 after 2 steps of 4 images at 8 px
    assert log[3]["alpha"] == pytest.approx(1 - 4 / 12, abs=1e-6) and log[5]["alpha"] == 0.0


def test_snapshot_in_the_middle_of_a_fade_records_its_alpha(crops: Path, tmp_path: Path) -> None:
    seen = []

    def stop_mid_fade(progress: dict) -> None:
        seen.append(progress["images"])
        if progress["images"] == 32:  # 8 px, its second step trained at alpha 1 - 4/12
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gan(_config(crops, tmp_path / "run", snapshot_images=4, scale_images=24), on_snapshot=stop_mid_fade)
    generator = load_generator(tmp_path / "run" / "generator.pt")
    assert generator.resolution == 8 and generator.alpha == pytest.approx(1 - 4 / 12)
    assert seen == [4, 8, 12, 16, 20, 24, 28, 32]


def test_resume_after_interruption_gives_exactly_the_weights_of_an_uninterrupted_run(
        crops: Path, tmp_path: Path) -> None:
    train_gan(_config(crops, tmp_path / "whole"))

    def interrupt(progress: dict) -> None:
        if progress["images"] == 40:  # inside the 8 px scale, between two scale ends
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_gan(_config(crops, tmp_path / "resumed"), on_snapshot=interrupt)
    assert load_generator(tmp_path / "resumed" / "generator.pt").resolution == 8
    # a line logged after the snapshot, before the crash, must not survive the resume
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"images": 44, "loss_d": 0.0}) + "\n")
    summary = train_gan(_config(crops, tmp_path / "resumed"), resume=True)
    assert summary["finished"] and summary["images"] == 72
    whole, resumed = _states(tmp_path / "whole"), _states(tmp_path / "resumed")
    for name in whole:
        for key, value in whole[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}.{key}"
    assert _log(tmp_path / "resumed") == _log(tmp_path / "whole")
    # resuming a finished run changes nothing
    assert train_gan(_config(crops, tmp_path / "resumed"), resume=True)["images"] == 72


def test_a_run_directory_is_resumed_or_refused_never_overwritten(crops: Path, tmp_path: Path) -> None:
    train_gan(_config(crops, tmp_path / "run", resolution=8))
    with pytest.raises(TrainingInputError, match="already holds a GAN run; pass --resume"):
        train_gan(_config(crops, tmp_path / "run", resolution=8))
    with pytest.raises(TrainingInputError, match=r"cannot resume with different lr \(saved: lr=0.001\)"):
        train_gan(_config(crops, tmp_path / "run", resolution=8, lr=0.002), resume=True)


def test_runs_are_deterministic_for_a_seed_and_differ_between_seeds(crops: Path, tmp_path: Path) -> None:
    first = GANTrainer(_config(crops, tmp_path / "a", resolution=8, seed=5))
    second = GANTrainer(_config(crops, tmp_path / "b", resolution=8, seed=5))
    other = GANTrainer(_config(crops, tmp_path / "c", resolution=8, seed=6))
    for trainer in (first, second, other):
        for _ in range(3):
            trainer.step()
    weights = [t.gan.generator.formatLayer.module.weight for t in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_lazy_penalty_comes_every_nth_step_of_a_scale_with_n_times_the_weight(crops: Path, tmp_path: Path) -> None:
    trainer = GANTrainer(_config(crops, tmp_path / "run", resolution=8, gp_every=4))
    weights = []
    train_step = trainer.gan.train_step

    def record(*args):
        weights.append(args[4])
        return train_step(*args)

    trainer.gan.train_step = record
    for _ in range(8):  # six steps at 4 px, then two at 8 px
        trainer.step()
    assert weights == [40.0, 0.0, 0.0, 0.0, 40.0, 0.0, 40.0, 0.0]


def test_loss_meter_averages_each_loss_over_the_steps_that_computed_it() -> None:
    meter = LossMeter()
    meter.add({"loss_d": torch.tensor(1.0), "gradient_penalty": torch.tensor(4.0)})
    meter.add({"loss_d": torch.tensor(3.0)})
    assert meter.take() == {"loss_d": 2.0, "gradient_penalty": 4.0}
    assert meter.take() == {}


# --- inputs ---------------------------------------------------------------------------------

def test_missing_image_folder_is_named_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        train_gan(GANTrainConfig(images=str(tmp_path / "nowhere"), out=str(tmp_path / "run"), **TINY))
    assert str(error.value) == f"{tmp_path / 'nowhere'}: no such image folder (expected a folder of PNG or JPEG images)"
    assert not (tmp_path / "run").exists()


def test_folder_without_images_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(TrainingInputError) as error:
        TrainingImages(tmp_path / "empty", 8)
    assert str(error.value) == f"{tmp_path / 'empty'}: no PNG or JPEG images found in the folder or below it"
    assert "\n" not in str(error.value)


def test_unreadable_images_are_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(folder / "wide.jpg")  # centre-cropped to a square
    Image.new("L", (6, 6), 128).save(folder / "grey.png")  # converted to RGB, upsized
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="patchscope.gan"):
        images = TrainingImages(folder, 8)
    assert len(images) == 2 and images.at(8).shape == (2, 3, 8, 8) and images.at(4).dtype == torch.uint8
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.png" in caplog.text
    (folder / "grey.png").unlink()
    (folder / "wide.jpg").unlink()
    with pytest.raises(TrainingInputError, match=r"mixed: none of its 1 image file\(s\) could be read"):
        TrainingImages(folder, 8)


@pytest.mark.parametrize("changes, message", [
    ({"resolution": 24}, "resolution=24: resolution must be a power of two >= 4, not 24"),
    ({"batch_size": 1}, "batch_size=1: expected an integer >= 2"),
    ({"fade_images": 24}, "fade_images=24: expected an integer >= 0 and <= 20"),
    ({"gp_every": 0}, "gp_every=0: expected an integer >= 1"),
    ({"lr": -1.0}, "lr=-1.0: expected a finite number > 0"),
    ({"mirror": "no"}, "mirror='no': expected true or false"),
])
def test_settings_that_cannot_train_are_refused(crops: Path, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        _config(crops, tmp_path / "run", **changes)
    assert not (tmp_path / "run").exists()


def test_tiny_yaml_config_names_only_known_settings_and_can_train(tmp_path: Path) -> None:
    import yaml

    yaml_path = Path(__file__).resolve().parents[2] / "configs" / "train_gan_tiny.yaml"
    settings = yaml.safe_load(yaml_path.read_text())
    names = {f.name for f in dataclasses.fields(GANTrainConfig)}
    assert set(settings) <= names, set(settings) - names
    config = GANTrainConfig(**settings, out=str(tmp_path / "run"))
    assert config.resolution == 32 and len(config.depths()) == 4
