"""Finetuning without a discriminator: the anchor to the frozen original (LPIPS and/or L2) stands in for the GAN
loss, the run says so and records it, MODULE:CALLABLE generators are saved as a safetensors state dict the same
callable reloads, resume is exact; and the moving average's default scales with the steps."""
from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import patchscope.attacks.finetune as finetune_module
from patchscope.attacks.finetune import FinetuneSettings, GeneratorFinetuner
from patchscope.attacks.finetune_anchor import default_ema_beta, ema_half_life
from patchscope.attacks.perceptual import load_lpips
from patchscope.common.errors import InputError
from patchscope.generators import load_generator
from patchscope.generators.custom import open_generator
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator, export_rosinality
from tests.attacks.test_finetune import HELD_OUT, detector, images, reals  # noqa: F401 - reals is a fixture

MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    latent_dim, resolution = 8, 16

    def __init__(self, critic=False):
        super().__init__()
        self.fc = nn.Linear(8, 8 * 4 * 4)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.rgb = nn.Conv2d(8, 3, 3, padding=1)
        if critic:
            self.discriminator = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                               nn.Flatten(), nn.Linear(4 * 8 * 8, 1))

    def forward(self, z):
        x = torch.relu(self.fc(z)).view(-1, 8, 4, 4)
        x = nn.functional.interpolate(x, scale_factor=4, mode="nearest")
        return torch.tanh(self.rgb(torch.relu(self.up(x))))


def make():
    torch.manual_seed(0)
    return Net()


def make_critic():
    torch.manual_seed(0)
    return Net(critic=True)


class Uniform(Net):
    """Trained on latents in [0, 1): its own sampler, which finetuning must use too."""

    def sample_latents(self, n, seed=0, start=0):
        return torch.rand(start + n, 8, generator=torch.Generator().manual_seed(seed))[start:]


def make_uniform():
    torch.manual_seed(0)
    return Uniform()
'''


@pytest.fixture
def own(tmp_path, monkeypatch) -> Path:
    (tmp_path / "anchorgen.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "anchorgen", raising=False)
    yield tmp_path
    sys.modules.pop("anchorgen", None)


def finetuner(reals, spec="anchorgen:make", lpips=None, **settings) -> GeneratorFinetuner:
    settings = FinetuneSettings(**{"classifier_weight": 10.0, "ema_beta": 0.5, "anchor": "l2", **settings})
    return GeneratorFinetuner(open_generator(spec), detector(), reals, settings, lpips=lpips)


def drift(result) -> float:
    """Mean squared difference between the finetuned and the original generator's held-out samples."""
    original = open_generator("anchorgen:make")
    return float((images(result.generator) - images(original)).square().mean())


def test_without_a_discriminator_the_anchor_keeps_g_near_the_original(own, reals, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="patchscope.finetune"):
        attack = finetuner(reals)
    assert "no discriminator: keeping G near the original with L2 to G0(z), weight 1" in caplog.text
    result = attack.run(6, batch=4, log_every=3, eval_n=16, progress=False)
    assert result.discriminator is None and result.settings["objective"] == "anchor"
    assert result.settings["anchor"] == "l2" and result.settings["format"] == "safetensors"
    record = result.history[-1]
    assert {"loss_anchor", "anchor_l2", "loss_classifier", "loss_g"} <= set(record) and "loss_d" not in record
    assert record["p_fake"] < result.history[0]["p_fake"] - 0.1  # the classifier is being fooled
    tight = finetuner(reals, anchor_weight=1000.0).run(6, batch=4, progress=False)
    loose = finetuner(reals, anchor_weight=0.0).run(6, batch=4, progress=False)
    assert drift(tight) < drift(loose) / 2, (drift(tight), drift(loose))  # Adam: step sizes alike, directions not


def test_an_lpips_anchor_needs_lpips(own, reals) -> None:
    with pytest.raises(InputError, match=r"anchor lpips\+l2: the generator has no discriminator and LPIPS has no "
                                         r"backbone weights; pass --lpips-weights FILE .* or --anchor l2"):
        finetuner(reals, anchor="lpips+l2")
    lpips = load_lpips("alex", None, allow_random=True)
    result = finetuner(reals, anchor="lpips+l2", lpips=lpips).run(2, batch=4, log_every=2, eval_n=4, progress=False)
    assert {"anchor_lpips", "anchor_l2"} <= set(result.history[-1])
    assert result.settings["anchor_lpips"] == "random"


def test_the_saved_state_dict_reloads_through_the_same_callable(own, reals, tmp_path) -> None:
    result = finetuner(reals).run(4, batch=4, out=tmp_path / "run", checkpoint_every=2, progress=False)
    assert result.checkpoint == tmp_path / "run" / "generator.safetensors"
    assert not (tmp_path / "run" / "generator.pt").exists()
    state = load_file(str(result.checkpoint))
    assert set(state) == set(open_generator("anchorgen:make").net.state_dict())
    reloaded = open_generator("anchorgen:make", weights=str(result.checkpoint))
    assert torch.equal(images(reloaded), images(result.generator))
    assert not torch.equal(images(reloaded), images(open_generator("anchorgen:make")))


def test_a_discriminator_of_your_own_trains_with_the_logistic_loss(own, reals, tmp_path) -> None:
    result = finetuner(reals, "anchorgen:make_critic").run(2, batch=4, out=tmp_path / "run", progress=False)
    assert result.settings["objective"] == "logistic-r1" and result.discriminator is not None
    state = load_file(str(result.checkpoint))
    assert "discriminator.3.weight" in state and "fc.weight" in state
    reloaded = open_generator("anchorgen:make_critic", weights=str(result.checkpoint))
    assert torch.equal(reloaded.discriminator[3].weight, result.discriminator[3].weight.detach().cpu())
    assert torch.equal(images(reloaded), images(result.generator))


def test_resume_without_a_discriminator_repeats_an_uninterrupted_run(own, reals, tmp_path, monkeypatch) -> None:
    options = {"batch": 4, "seed": 2, "checkpoint_every": 2, "log_every": 2, "eval_n": 4, "progress": False}
    # an auto average whose value depends on the steps, to see that a resume keeps the first run's
    monkeypatch.setattr(finetune_module, "default_ema_beta", lambda steps: 0.5 + steps / 100)
    straight = finetuner(reals, ema_beta=None).run(4, out=tmp_path / "straight", **options)
    assert straight.settings["ema_beta"] == 0.54 and straight.settings["ema_beta_auto"] is True
    finetuner(reals, ema_beta=None).run(2, out=tmp_path / "resumed", **options)
    resumed = finetuner(reals, ema_beta=None).run(4, out=tmp_path / "resumed", resume=True, **options)
    assert resumed.settings["ema_beta"] == 0.52  # resolved for the 2 steps first asked for, and kept
    monkeypatch.setattr(finetune_module, "default_ema_beta", lambda steps: 0.54)
    finetuner(reals, ema_beta=None).run(2, out=tmp_path / "again", **options)
    again = finetuner(reals, ema_beta=None).run(4, out=tmp_path / "again", resume=True, **options)
    assert again.steps == 4
    first, second = load_file(str(tmp_path / "straight" / "generator.safetensors")), load_file(
        str(tmp_path / "again" / "generator.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "again" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


def test_a_stylegan2_without_its_discriminator_is_written_without_d(reals, tmp_path) -> None:
    torch.manual_seed(0)
    generator = StyleGAN2Generator(StyleGAN2Config(size=16, style_dim=8, n_mlp=1, channels=(8, 8, 8)))
    torch.save(export_rosinality(generator), tmp_path / "sg2.pt")
    loaded = load_generator(tmp_path / "sg2.pt")
    assert loaded.discriminator is None
    settings = FinetuneSettings(classifier_weight=10.0, ema_beta=0.5, anchor="l2")
    result = GeneratorFinetuner(loaded, detector(), reals, settings).run(2, batch=4, out=tmp_path / "run",
                                                                       progress=False)
    assert result.checkpoint == tmp_path / "run" / "generator.pt" and result.settings["format"] == "sg2_rosinality"
    assert "d" not in torch.load(result.checkpoint, weights_only=True)
    reloaded = load_generator(result.checkpoint)
    z = reloaded.sample_latents(2, HELD_OUT)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(z, noise_mode="const"), result.generator.eval()(z, noise_mode="const"))


def test_the_default_moving_average_scales_with_the_steps(own, reals, caplog) -> None:
    assert default_ema_beta(300) == pytest.approx(0.5 ** (1 / 30), abs=1e-6)
    assert default_ema_beta(1000) == 0.993092
    assert default_ema_beta(10) == 0.9 and default_ema_beta(0) == 0.9 and default_ema_beta(10 ** 6) == 0.999
    assert ema_half_life(default_ema_beta(300)) == pytest.approx(30, rel=1e-3)
    with caplog.at_level(logging.WARNING, logger="patchscope.finetune"):
        auto = finetuner(reals, ema_beta=None).run(3, batch=4, progress=False)
        assert auto.settings["ema_beta"] == 0.9 and not caplog.records
        explicit = finetuner(reals, ema_beta=0.999).run(3, batch=4, progress=False)
    assert explicit.settings["ema_beta"] == 0.999 and "ema_beta_auto" not in explicit.settings
    assert "half-life is 693 steps, longer than this 3-step run" in caplog.text


def test_finetuning_draws_a_module_s_latents_from_its_own_sampler(own, reals) -> None:
    """A module with its own `sample_latents` is finetuned on latents like those it was made for, not N(0, 1)."""
    tuner = finetuner(reals, spec="anchorgen:make_uniform")
    draws = torch.Generator().manual_seed(3)
    z = tuner._latents(6, draws)
    assert z.shape == (6, 8) and float(z.min()) >= 0 and float(z.max()) < 1
    assert torch.equal(z, tuner._latents(6, torch.Generator().manual_seed(3)))  # seeded by the step's draws
    stock = finetuner(reals)._latents(6, torch.Generator().manual_seed(3))
    assert float(stock.min()) < 0  # the stock stream stays N(0, 1)
