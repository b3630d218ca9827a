"""GAN inversion: the latent optimiser, tensor-level `invert` on tiny random generators, and
`invert_folder`'s files, resume and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.attacks.invert import InvertConfig, invert, invert_folder, to_png_bytes
import patchscope.attacks.invert as invert_module
from patchscope.attacks.latent_optim import frozen, optimize_latents
from patchscope.attacks.perceptual import load_lpips
from patchscope.common.errors import InputError
from patchscope.generators import load_generator
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator
from patchscope.generators.pgan.zoo import save_pgan_zoo
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator
from tests.tiny_models import LATENT_DIM, RESOLUTION, tiny_pgan




@pytest.fixture(scope="module")
def pgan():
    return tiny_pgan()[0]


@pytest.fixture(scope="module")
def random_lpips():
    return load_lpips("alex", allow_random=True)


@pytest.fixture(scope="module")
def stylegan2():
    torch.manual_seed(0)
    return StyleGAN2Generator(StyleGAN2Config(size=16, style_dim=16, n_mlp=2, channels=(16, 16, 16))).eval()


# ----------------------------------------------------------------------------- the optimiser

def test_optimiser_minimises_a_per_sample_quadratic_and_leaves_init_untouched() -> None:
    target = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    init = {"x": torch.zeros(2, 3)}
    result = optimize_latents(init, lambda p, step: (p["x"] - target).square().sum(dim=1), steps=300, lr=0.1)
    torch.testing.assert_close(result.latents["x"], target, atol=2e-2, rtol=0)
    assert result.losses.shape == (2,) and bool((result.losses < 1e-3).all())
    assert len(result.history) == 300 and result.history[-1] < result.history[0] / 1000
    assert torch.equal(init["x"], torch.zeros(2, 3))


def test_optimiser_keeps_each_samples_best_latents_or_the_final_ones() -> None:
    # From step 5 on sample 0's loss jumps up, so its best latents are those seen at step 5.
    def loss_fn(p, step):
        penalty = torch.tensor([100.0 if step >= 6 else 0.0, 0.0])
        return (p["x"] - 4).square().sum(dim=1) + penalty

    seen: dict[int, torch.Tensor] = {}
    record = lambda step, losses, latents: seen.setdefault(step, latents["x"].clone())  # noqa: E731
    best = optimize_latents({"x": torch.zeros(2, 1)}, loss_fn, steps=20, lr=0.1, callback=record)
    final = optimize_latents({"x": torch.zeros(2, 1)}, loss_fn, steps=20, lr=0.1, keep="final")
    assert sorted(seen) == list(range(20))
    torch.testing.assert_close(best.latents["x"][0], seen[4][0])  # after step 4's update = scored at step 5
    torch.testing.assert_close(best.latents["x"][1], final.latents["x"][1])
    assert float(final.losses[0]) > 100 > float(best.losses[0])


def test_optimiser_fits_one_shared_latent_over_fresh_batches() -> None:
    gen = torch.Generator().manual_seed(0)

    def loss_fn(p, step):  # a shift that moves fresh N(0, 1) batches onto the point 3
        z = torch.randn(16, 2, generator=gen)
        return ((z + p["shift"]) - 3).square().sum(dim=1).mean()

    result = optimize_latents({"shift": torch.zeros(2)}, loss_fn, steps=300, lr=0.05, keep="final")
    assert result.losses.ndim == 0
    torch.testing.assert_close(result.latents["shift"], torch.full((2,), 3.0), atol=0.3, rtol=0)


def test_frozen_stops_parameter_gradients_and_restores_the_module_afterwards() -> None:
    layer = torch.nn.Linear(2, 2)
    layer.train()
    with frozen(layer):
        assert not layer.training and not any(p.requires_grad for p in layer.parameters())
        x = torch.ones(1, 2, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and layer.weight.grad is None
    assert layer.training and all(p.requires_grad for p in layer.parameters())


# ----------------------------------------------------------------------------- invert

def test_pgan_inversion_recovers_images_generated_from_known_latents(pgan) -> None:
    with torch.no_grad():
        targets = pgan(pgan.sample_latents(4, seed=123))
    start = invert(pgan, targets, InvertConfig(space="z", steps=0, lambda_lpips=0, seed=7), progress=False)
    result = invert(pgan, targets, InvertConfig(space="z", steps=100, lr=0.1, lambda_lpips=0, seed=7), progress=False)
    assert result.latents.shape == (4, LATENT_DIM) and result.images.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert bool((result.losses["mse"] < start.losses["mse"] / 20).all()), (start.losses, result.losses)
    assert float(result.losses["mse"].mean()) < 1e-3
    # the latents returned are the ones that make the reconstructions
    with torch.no_grad():
        torch.testing.assert_close(pgan(result.latents).clamp(-1, 1), result.images)


def test_inversion_results_do_not_depend_on_batch_size(pgan, random_lpips) -> None:
    with torch.no_grad():
        targets = pgan(pgan.sample_latents(3, seed=9))
    whole = invert(pgan, targets, InvertConfig(space="z", steps=15, batch_size=3), random_lpips, progress=False)
    single = invert(pgan, targets, InvertConfig(space="z", steps=15, batch_size=1), random_lpips, progress=False)
    torch.testing.assert_close(whole.latents, single.latents, atol=1e-4, rtol=1e-4)
    assert set(whole.losses) == {"loss", "mse", "lpips"}


def test_z_of_image_i_starts_at_row_i_of_the_seed_stream(pgan) -> None:
    targets = torch.zeros(3, 3, RESOLUTION, RESOLUTION)
    start = invert(pgan, targets, InvertConfig(space="z", steps=0, lambda_lpips=0, seed=5), indices=[4, 5, 9], progress=False)
    stream = pgan.sample_latents(10, seed=5)
    torch.testing.assert_close(start.latents, stream[[4, 5, 9]])


def test_glow_split_noise_is_fixed_per_image_by_seed_and_index() -> None:
    torch.manual_seed(0)
    glow = Glow(GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2, permutation="reverse"))
    with torch.no_grad():  # move the zero-initialised layers so the flow is not the identity
        for p in glow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    generator = GlowGenerator(glow).eval()
    with torch.no_grad():
        targets = generator(generator.sample_latents(3, seed=4, start=2),
                            split_noise=generator.sample_split_noise(3, seed=4, start=2)).clamp(-1, 1)
    # Started at the very latents and noise that made the targets, nothing is left to fit.
    start = invert(generator, targets, InvertConfig(space="z", steps=0, lambda_lpips=0, seed=4, batch_size=2), indices=[2, 3, 4], progress=False)
    assert float(start.losses["mse"].max()) < 1e-10
    other_seed = invert(generator, targets, InvertConfig(space="z", steps=0, lambda_lpips=0, seed=5), indices=[2, 3, 4], progress=False)
    assert float(other_seed.losses["mse"].min()) > 1e-3


def test_images_are_resized_to_the_generator_resolution(pgan) -> None:
    result = invert(pgan, torch.zeros(2, 3, 40, 32), InvertConfig(space="z", steps=1, lambda_lpips=0), progress=False)
    assert result.images.shape == (2, 3, RESOLUTION, RESOLUTION)


@pytest.mark.parametrize("space, shape", [("w", (3, 16)), ("w+", (3, 6, 16))])
def test_style_generator_inversion_in_w_and_w_plus_lowers_the_loss(stylegan2, random_lpips, space, shape) -> None:
    with torch.no_grad():
        targets = stylegan2(stylegan2.sample_latents(3, seed=5)).clamp(-1, 1)
    start = invert(stylegan2, targets, InvertConfig(space=space, steps=0, lr=0.05), random_lpips, progress=False)
    result = invert(stylegan2, targets, InvertConfig(space=space, steps=30, lr=0.05), random_lpips, progress=False)
    assert result.latents.shape == shape
    assert bool((result.losses["loss"] < 0.5 * start.losses["loss"]).all()), (start.losses, result.losses)
    assert float(result.losses["lpips"].mean()) < float(start.losses["lpips"].mean())


def test_w_space_starts_at_the_generators_w_avg(stylegan2) -> None:
    stylegan2.w_avg.copy_(torch.linspace(-1, 1, 16))
    try:
        start = invert(stylegan2, torch.zeros(2, 3, 16, 16), InvertConfig(space="w+", steps=0, lambda_lpips=0), progress=False)
    finally:
        stylegan2.w_avg.zero_()
    assert torch.equal(start.latents, torch.linspace(-1, 1, 16).expand(2, 6, 16))


def test_w_space_needs_a_style_generator(pgan) -> None:
    with pytest.raises(ValueError, match="needs a style generator"):
        invert(pgan, torch.zeros(1, 3, RESOLUTION, RESOLUTION), InvertConfig(space="w", steps=1, lambda_lpips=0))


def test_lpips_weight_without_an_lpips_model_is_refused(pgan) -> None:
    with pytest.raises(ValueError, match="needs an LPIPS model"):
        invert(pgan, torch.zeros(1, 3, RESOLUTION, RESOLUTION), InvertConfig(space="z", steps=1))


def test_generator_parameters_get_no_gradients_and_keep_their_flags(pgan) -> None:
    invert(pgan, torch.zeros(1, 3, RESOLUTION, RESOLUTION), InvertConfig(space="z", steps=2, lambda_lpips=0), progress=False)
    assert all(p.grad is None and p.requires_grad for p in pgan.parameters())


# ----------------------------------------------------------------------------- folders

@pytest.fixture()
def folder_case(tmp_path: Path) -> dict:
    """A saved tiny PGAN and five of its images (one in a subfolder) as PNG files."""
    generator, discriminator = tiny_pgan()
    checkpoint = tmp_path / "pgan.pt"
    save_pgan_zoo(generator, checkpoint, discriminator=discriminator)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    with torch.no_grad():
        fakes = generator(generator.sample_latents(5, seed=77)).clamp(-1, 1)
    names = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]
    for name, image in zip(names, fakes):
        (images / name).write_bytes(to_png_bytes(image))
    return {"generator": checkpoint, "images": images, "names": names, "out": tmp_path / "out"}


def _config(case: dict, **overrides) -> InvertConfig:
    settings = dict(generator=str(case["generator"]), images=str(case["images"]), out=str(case["out"]),
                    steps=10, lr=0.1, batch_size=2, lpips_net="squeeze", lpips_random=True, device="cpu")
    return InvertConfig(**{**settings, **overrides})


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_folder_inversion_writes_reprojections_latents_and_metrics_that_agree(folder_case) -> None:
    summary = invert_folder(_config(folder_case))
    out = folder_case["out"]
    assert summary["inverted"] == 5 and summary["resumed"] == 0 and summary["skipped"] == 0
    latents = torch.load(out / "latents.pt", weights_only=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(latents) == sorted(metrics["images"]) == sorted(folder_case["names"])
    assert metrics["space"] == "z" and metrics["lpips"] == "random" and metrics["count"] == 5
    generator = load_generator(folder_case["generator"])
    for name in folder_case["names"]:
        assert latents[name].shape == (LATENT_DIM,)
        with torch.no_grad():
            rebuilt = generator(latents[name][None]).clamp(-1, 1)[0]
        expected = ((rebuilt + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        saved = _pixels(out / name)
        assert saved.shape == (RESOLUTION, RESOLUTION, 3)
        np.testing.assert_array_equal(saved, expected)
        target = torch.from_numpy(_pixels(folder_case["images"] / name).copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert metrics["images"][name]["mse"] == pytest.approx(float((rebuilt - target).square().mean()), rel=1e-4)
        assert set(metrics["images"][name]) == {"loss", "mse", "lpips"}
    assert metrics["mean"]["mse"] == pytest.approx(np.mean([r["mse"] for r in metrics["images"].values()]))
    assert (out / "config.yaml").is_file()


def test_interrupted_folder_inversion_resumes_without_redoing_finished_batches(folder_case, monkeypatch) -> None:
    calls: list[int] = []
    real_invert = invert_module.invert

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(invert_module, "invert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        invert_folder(_config(folder_case))
    out = folder_case["out"]
    first_batch = json.loads((out / "metrics.json").read_text())["images"]
    assert sorted(first_batch) == ["a.png", "b.png"] and not (out / "c.png").exists()
    written = (out / "a.png").stat().st_mtime_ns

    calls.clear()
    summary = invert_folder(_config(folder_case, batch_size=3), resume=True)  # batch size may change
    assert calls == [3]  # c, d, sub/e in one batch; a and b not redone
    assert summary["resumed"] == 2 and summary["inverted"] == 3
    assert (out / "a.png").stat().st_mtime_ns == written

    monkeypatch.setattr(invert_module, "invert", real_invert)
    invert_folder(_config(folder_case, out=str(folder_case["out"].with_name("clean"))))
    resumed = torch.load(out / "latents.pt", weights_only=True)
    clean = torch.load(folder_case["out"].with_name("clean") / "latents.pt", weights_only=True)
    for name in folder_case["names"]:
        torch.testing.assert_close(resumed[name], clean[name], atol=1e-4, rtol=1e-4)

    calls.clear()
    monkeypatch.setattr(invert_module, "invert", interrupted)
    assert invert_folder(_config(folder_case), resume=True)["inverted"] == 0 and calls == []


def test_existing_output_is_refused_without_resume_and_with_other_settings(folder_case) -> None:
    invert_folder(_config(folder_case, steps=1))
    with pytest.raises(InputError, match=r"already holds an inversion; pass --resume to continue it"):
        invert_folder(_config(folder_case, steps=1))
    with pytest.raises(InputError, match=r"cannot resume with different steps, lr \(saved: steps=1, lr=0\.1\)"):
        invert_folder(_config(folder_case, steps=2, lr=0.2), resume=True)


def test_resume_with_another_generator_file_is_refused(folder_case) -> None:
    invert_folder(_config(folder_case, steps=1))
    generator, discriminator = tiny_pgan(seed=1)
    save_pgan_zoo(generator, folder_case["generator"], discriminator=discriminator)
    with pytest.raises(InputError, match="another generator file"):
        invert_folder(_config(folder_case, steps=1), resume=True)


def test_missing_required_setting_is_named(folder_case) -> None:
    with pytest.raises(InputError, match="no --images given"):
        invert_folder(_config(folder_case, images=""))


def test_unreadable_image_is_skipped_and_named_in_metrics(folder_case) -> None:
    (folder_case["images"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = invert_folder(_config(folder_case, steps=1))
    metrics = json.loads((folder_case["out"] / "metrics.json").read_text())
    assert summary["skipped"] == 1 and "broken.png" in metrics["skipped"]
    assert metrics["count"] == 5 and not (folder_case["out"] / "broken.png").exists()
    with pytest.raises(InputError, match="broken.png"):
        invert_folder(_config(folder_case, steps=1, on_bad_image="error",
                              out=str(folder_case["out"].with_name("strict"))))


def test_output_folder_inside_the_images_folder_is_refused(folder_case) -> None:
    with pytest.raises(InputError, match="inside the images folder"):
        invert_folder(_config(folder_case, out=str(folder_case["images"] / "inverted")))


def test_w_space_on_a_pgan_file_is_a_one_line_user_error(folder_case) -> None:
    with pytest.raises(InputError, match=r"--space w: .*needs a style generator"):
        invert_folder(_config(folder_case, space="w"))
