"""Latent-shift exaggeration (eq. 3) on tiny random generators and a classifier whose P(fake) is a
known function of brightness: the learned shift makes held-out samples more fake, monotonically in k."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from patchscope.attacks.perceptual import load_lpips
from patchscope.attacks.shift import (SIGN_CONVENTION, ClassifierInput, ShiftExaggeration, check_held_out, evaluate_shift,
                           load_shift, save_shift, step_seed)
from patchscope.common.errors import InputError
from patchscope.forensics.models import PatchClassifier, build_model
from patchscope.forensics.scoring import image_scores
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator
from tests.tiny_models import LATENT_DIM, RESOLUTION, tiny_pgan  # noqa: F401 - re-exported to other tests

SLOPE = 4.0
HELD_OUT = 123  # latents never drawn by the fits below (checked in the test that uses them)



def brightness_classifier(slope: float = SLOPE, offset: float = 0.0) -> PatchClassifier:
    """An xception_block1 wired by hand so that every patch's P(fake) = sigmoid(slope·m + offset),
    m the mean of a 3x3x3 window: brighter means more fake, something a generator can change."""
    model = build_model("xception_block1", seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1)
                module.running_mean.zero_()
                module.running_var.fill_(1 - module.eps)  # exactly the identity in eval mode
        model.conv1.weight[0] = 1 / 27
        model.bn1.bias[0] = 1.0  # m + 1 >= 0 for images in [-1, 1], so the ReLUs pass it
        model.conv2.weight[0, 0, 1, 1] = 1
        model.block1.skip.weight[0, 0] = 1
        model.convout.weight[1, 0] = slope
        model.convout.bias[1] = offset - slope
    return model.eval()


@pytest.fixture(scope="module")
def pgan():
    return tiny_pgan()[0]


@pytest.fixture(scope="module")
def classifier():
    return brightness_classifier()


@pytest.fixture(scope="module")
def random_lpips():
    return load_lpips("alex", allow_random=True)


def _attack(generator, classifier, lpips, **options) -> ShiftExaggeration:
    return ShiftExaggeration(generator, classifier, lpips, **{"precision": "fp32", **options})


@pytest.fixture(scope="module")
def fitted(pgan, classifier, random_lpips):
    attack = _attack(pgan, classifier, random_lpips, lam=1.0)
    result = attack.fit(steps=40, batch=8, lr=0.02, seed=0, progress=False)
    return attack, result, attack.sweep(result.shift, n=32, seed=HELD_OUT, keep_images=True)


def test_the_test_classifier_scores_brightness_as_fakeness(classifier) -> None:
    for value in (-0.5, 0.0, 0.3):
        logits = classifier(torch.full((1, 3, 20, 20), value))
        expected = torch.sigmoid(torch.tensor(SLOPE * value))
        torch.testing.assert_close(image_scores(logits)[0], expected, atol=1e-5, rtol=0)


def test_learned_shift_raises_p_fake_on_held_out_latents(pgan, classifier, fitted) -> None:
    attack, result, _ = fitted
    check_held_out(0, 40, HELD_OUT)  # the fit never drew these latents
    rows = evaluate_shift(pgan, classifier, result.shift, ks=(0, 1), n=32, seed=HELD_OUT, precision="fp32")
    assert [row["k"] for row in rows] == [0.0, 1.0] and rows[0]["n"] == 32
    assert rows[1]["p_fake"] > rows[0]["p_fake"] + 0.03, rows
    assert result.shift.shape == (LATENT_DIM,) and result.space == "z"
    assert result.final["fake_loss"] < result.history[0]["fake_loss"] - 0.05, (result.history[0], result.final)
    assert result.history[0]["lpips"] == 0  # the fit starts at the zero shift


def test_p_fake_is_monotone_in_k_and_lpips_is_zero_only_at_k0(fitted) -> None:
    _, _, sweep = fitted
    rows = sweep.rows()
    assert [row["k"] for row in rows] == [-2, -1, 0, 1, 2]
    p_fake = [row["p_fake"] for row in rows]
    assert p_fake == sorted(p_fake) and len(set(p_fake)) == 5, p_fake
    assert bool((sweep.lpips[:, 2] == 0).all())
    assert bool((sweep.lpips[:, [0, 1, 3, 4]] > 0).all())


def test_held_out_scores_do_not_depend_on_the_evaluation_batch_size(fitted) -> None:
    attack, result, sweep = fitted
    rebatched = attack.sweep(result.shift, n=32, seed=HELD_OUT, batch=5)
    torch.testing.assert_close(rebatched.p_fake, sweep.p_fake, atol=1e-6, rtol=0)
    torch.testing.assert_close(rebatched.lpips, sweep.lpips, atol=1e-6, rtol=0)


def test_the_shift_exaggerates_what_the_classifier_detects(pgan, fitted) -> None:
    _, _, sweep = fitted
    brightness = sweep.images.mean(dim=(0, 2, 3, 4))
    assert brightness.tolist() == sorted(brightness.tolist()), brightness
    with torch.no_grad():
        originals = pgan(pgan.sample_latents(32, HELD_OUT)).clamp(-1, 1)
    torch.testing.assert_close(sweep.images[:, 2], originals)  # column k = 0 is the plain sample


def test_a_larger_lambda_keeps_the_shifted_images_closer(pgan, classifier, random_lpips) -> None:
    distances = []
    for lam in (0.0, 20.0):
        attack = _attack(pgan, classifier, random_lpips, lam=lam)
        shift = attack.fit(steps=30, batch=8, lr=0.05, seed=0, progress=False).shift
        distances.append(attack.sweep(shift, ks=(1,), n=16, seed=HELD_OUT).lpips.mean().item())
    assert distances[1] < 0.7 * distances[0], distances


def test_every_step_draws_a_fresh_reproducible_batch(pgan, classifier, monkeypatch) -> None:
    drawn: list[int] = []
    original = type(pgan).sample_latents

    def recording(self, n, seed=0, start=0):
        drawn.append(seed)
        return original(self, n, seed, start)

    monkeypatch.setattr(type(pgan), "sample_latents", recording)
    attack = _attack(pgan, classifier, None, lam=0.0)
    first = attack.fit(steps=4, batch=4, lr=0.05, seed=7, progress=False).shift
    assert drawn == [step_seed(7, step) for step in range(5)] and len(set(drawn)) == 5
    again = attack.fit(steps=4, batch=4, lr=0.05, seed=7, progress=False).shift
    other = attack.fit(steps=4, batch=4, lr=0.05, seed=8, progress=False).shift
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_an_evaluation_seed_a_training_batch_used_is_refused() -> None:
    check_held_out(0, 10, 1)
    with pytest.raises(ValueError, match="one of the training batch seeds"):
        check_held_out(0, 10, step_seed(0, 3))


def test_networks_get_no_gradients_and_keep_their_flags(classifier, random_lpips) -> None:
    generator = tiny_pgan()[0].train()
    _attack(generator, classifier, random_lpips).fit(steps=2, batch=2, lr=0.05, progress=False)
    for net in (generator, classifier):
        assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert generator.training and not classifier.training


def test_the_classifier_sees_the_output_resized_and_cropped_as_it_was_trained(pgan, classifier) -> None:
    view = ClassifierInput(load_size=24, crop_size=20)
    images = torch.linspace(-1.5, 1.5, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    resized = F.interpolate(images.clamp(-1, 1), size=(24, 24), mode="bilinear", align_corners=False,
                            antialias=True)
    torch.testing.assert_close(view(images), resized[..., 2:22, 2:22])
    assert ClassifierInput.from_meta({"config": {"load_size": 24, "crop_size": 20}}) == view

    seen: list[tuple[int, ...]] = []
    hook = classifier.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        _attack(pgan, classifier, None, lam=0.0, classifier_input=view).fit(steps=1, batch=3, progress=False)
    finally:
        hook.remove()
    assert seen == [(3, 3, 20, 20)] * 2
    with pytest.raises(ValueError, match="crop 40 px is larger than the 24x24 image"):
        ClassifierInput(24, 40)(images)


def test_style_generator_shift_in_w_space_runs_end_to_end(classifier, random_lpips) -> None:
    torch.manual_seed(0)
    # Random noise on purpose: the renderer must fix it, or G(z) and G(z − 0·w) would differ.
    stylegan2 = StyleGAN2Generator(StyleGAN2Config(size=16, style_dim=16, n_mlp=2, channels=(16, 16, 16)),
                                   noise_mode="random").eval()
    attack = _attack(stylegan2, classifier, random_lpips)
    result = attack.fit(steps=8, batch=4, lr=0.05, progress=False)
    assert attack.space == "w" and result.space == "w" and result.shift.shape == (16,)
    sweep = attack.sweep(result.shift, ks=(0, 1), n=4, seed=HELD_OUT)
    assert bool((sweep.lpips[:, 0] == 0).all()) and bool((sweep.lpips[:, 1] > 0).all())
    assert _attack(stylegan2, classifier, random_lpips, space="z").dim == stylegan2.latent_dim


def test_glow_shift_in_z_space_runs_end_to_end(classifier, random_lpips) -> None:
    torch.manual_seed(0)
    glow = Glow(GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2, permutation="reverse"))
    with torch.no_grad():  # move the zero-initialised layers so the flow is not the identity
        for param in glow.parameters():
            param.add_(0.05 * torch.randn_like(param))
    generator = GlowGenerator(glow).eval()
    attack = _attack(generator, classifier, random_lpips)
    result = attack.fit(steps=8, batch=4, lr=0.05, progress=False)
    assert attack.space == "z" and result.shift.shape == (generator.latent_dim,)
    sweep = attack.sweep(result.shift, ks=(0, 2), n=4, seed=HELD_OUT)
    # split levels are drawn once per latent, so only the shift moves the image
    assert bool((sweep.lpips[:, 0] == 0).all()) and bool((sweep.lpips[:, 1] > 0).all())


def test_impossible_settings_are_refused(pgan, classifier, random_lpips) -> None:
    with pytest.raises(ValueError, match="needs a style generator"):
        _attack(pgan, classifier, random_lpips, space="w")
    with pytest.raises(ValueError, match="needs an LPIPS model"):
        _attack(pgan, classifier, None, lam=1.0)
    with pytest.raises(ValueError, match=r"shift has shape \[5\]; PGANZooGenerator in z space needs \[8\]"):
        _attack(pgan, classifier, random_lpips).sweep(torch.zeros(5), n=1)


def test_shift_files_round_trip_and_load_with_weights_only(tmp_path: Path) -> None:
    shift = torch.linspace(-1, 1, LATENT_DIM)
    save_shift(tmp_path, shift, {"space": "z", "lam": 1.0})
    assert torch.equal(torch.load(tmp_path / "shift.pt", weights_only=True)["shift"], shift)
    loaded, meta = load_shift(tmp_path / "shift.pt")
    assert torch.equal(loaded, shift)
    assert meta["space"] == "z" and meta["dim"] == LATENT_DIM and meta["sign_convention"] == SIGN_CONVENTION
    assert json.loads((tmp_path / "shift.json").read_text()) == meta
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_unreadable_shift_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"shift\.json: missing or unreadable shift metadata"):
        load_shift(tmp_path)
    save_shift(tmp_path, torch.zeros(3), {"space": "z"})
    (tmp_path / "shift.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"shift\.pt: unreadable shift tensor file"):
        load_shift(tmp_path)
    (tmp_path / "shift.json").write_text(json.dumps({"kind": "patchscope-classifier"}))
    with pytest.raises(InputError, match="not a patchscope shift file"):
        load_shift(tmp_path)
