"""Truncation (and style mixing) on mappings at the scale the public code initialises them.

The shared fixtures' mappings give w within ~1e-3 of w_avg, so a truncation that ignored psi,
reversed the lerp or missed the cutoff would still pass their image tests. Here the mappings
start as the public code starts them (weights N(0, 1/lrmul^2) with lrmul 0.01, zero biases),
w_avg is the mapping's mean (what `dlatent_avg` / `w_avg` track, rosinality's `mean_latent`),
and w - w_avg is of order one.

Public formulas:
- StyleGAN v1, NVlabs/stylegan @ 1e0d5c7, training/networks_stylegan.py:369-374 (`G_style`):
  coefs = psi on layers < truncation_cutoff, 1 elsewhere; dlatents = lerp(dlatent_avg, dlatents, coefs).
- rosinality stylegan2-pytorch @ bef283a, model.py:521-529: `truncation_latent + truncation *
  (style - truncation_latent)` on every style (before mixing).
- NVlabs stylegan2-ada-pytorch @ d72cc7d, training/networks.py:242-248 (`MappingNetwork`):
  `w_avg.lerp(x, psi)` on all layers, or on `x[:, :truncation_cutoff]`. The stored reference
  (tests/data/minibatch_stddev/truncation_sg2ada.npz) is that code's own output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.generators.stylegan.model import StyleGAN, StyleGANConfig
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator

DATA = Path(__file__).resolve().parents[1] / "data" / "minibatch_stddev"
LRMUL = 0.01


def _latents(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _public_formula(ws: torch.Tensor, w_avg: torch.Tensor, psi: float, cutoff: int | None) -> torch.Tensor:
    """w_avg + psi * (w - w_avg) on layers < cutoff (all when None), w elsewhere."""
    layer = torch.arange(ws.shape[1])[None, :, None]
    coefs = torch.where(layer < (ws.shape[1] if cutoff is None else cutoff), psi, 1.0)
    return w_avg + (ws - w_avg) * coefs


def _assert_realistic_mapping(weights: list[torch.Tensor], ws: torch.Tensor, w_avg: torch.Tensor) -> None:
    for weight in weights:  # equalized lr with lrmul 0.01: stored weights are N(0, 100^2)
        assert weight.std().item() == pytest.approx(1 / LRMUL, rel=0.1)
    spread = (ws - w_avg).abs().mean().item()
    assert spread > 0.1, f"w is only {spread:.2g} from w_avg: truncation would hardly move it"


@pytest.fixture(scope="module")
def stylegan() -> StyleGAN:
    """StyleGAN v1 with the paper's mapping (8 x 512, lrmul 0.01) and a small synthesis, at TF init."""
    torch.manual_seed(0)
    cfg = StyleGANConfig(resolution=64, fmap_base=64, fmap_max=16)
    gen = StyleGAN(cfg).eval()
    with torch.no_grad():
        gen.w_avg.copy_(gen.mapping_network(_latents(4096, cfg.latent_dim, 1)).mean(dim=0))
    return gen


@torch.no_grad()
def test_stylegan_v1_mapping_starts_at_the_public_scale(stylegan: StyleGAN) -> None:
    ws = stylegan.mapping(_latents(4, 512, 2), psi=1)
    assert ws.shape == (4, 10, 512) and torch.equal(ws, ws[:, :1].expand_as(ws))
    assert all(torch.equal(layer.bias, torch.zeros_like(layer.bias)) for layer in stylegan.mapping_network.dense)
    _assert_realistic_mapping([layer.weight for layer in stylegan.mapping_network.dense], ws, stylegan.w_avg)


@torch.no_grad()
@pytest.mark.parametrize(("psi", "cutoff"), [(0.7, 8), (0.5, 4), (0.5, 10), (0.0, 8), (-0.5, 3), (1.5, 6)])
def test_stylegan_v1_truncation_follows_g_style(stylegan: StyleGAN, psi: float, cutoff: int) -> None:
    z = _latents(4, 512, 2)
    ws = stylegan.mapping(z, psi=1)
    expected = _public_formula(ws, stylegan.w_avg, psi, cutoff)
    truncated = stylegan.mapping(z, psi=psi, truncation_cutoff=cutoff)
    torch.testing.assert_close(truncated, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(truncated[:, cutoff:], ws[:, cutoff:], rtol=0, atol=0)
    if psi != 1:
        assert (truncated[:, :cutoff] - ws[:, :cutoff]).abs().mean() > 0.05


@torch.no_grad()
def test_stylegan_v1_default_sampling_truncates_the_first_8_of_10_layers(stylegan: StyleGAN) -> None:
    z = _latents(4, 512, 3)
    expected = _public_formula(stylegan.mapping(z, psi=1), stylegan.w_avg, 0.7, 8)
    torch.testing.assert_close(stylegan.mapping(z), expected, rtol=1e-5, atol=1e-6)
    images = stylegan(z)
    torch.testing.assert_close(images, stylegan.synthesis(expected), rtol=0, atol=1e-4 * images.abs().max().item())
    assert (images - stylegan(z, psi=1)).abs().mean() > 1e-2 * images.abs().mean()


@torch.no_grad()
def test_stylegan_v1_cutoff_none_means_no_truncation_as_g_style(stylegan: StyleGAN) -> None:
    """G_style builds its Truncation block only when `truncation_cutoff is not None`: None is off,
    not every layer (StyleGAN2's reading); the shared helper alone would truncate all 10."""
    z = _latents(3, 512, 4)
    ws = stylegan.mapping(z, psi=1)
    untruncated = StyleGAN(stylegan.cfg, psi=0.5, truncation_cutoff=None).eval()
    untruncated.load_state_dict(stylegan.state_dict())
    torch.testing.assert_close(untruncated.mapping(z), ws, rtol=0, atol=0)
    torch.testing.assert_close(untruncated.mapping(z, truncation_cutoff=4),
                               _public_formula(ws, stylegan.w_avg, 0.5, 4), rtol=1e-5, atol=1e-6)
    assert (untruncated.mapping(z, truncation_cutoff=4) - ws).abs().mean() > 0.05


@pytest.fixture(scope="module")
def stylegan2() -> StyleGAN2Generator:
    """StyleGAN2 with the real mapping (8 x 512, lr_mlp 0.01) and a small synthesis, at rosinality's init."""
    torch.manual_seed(0)
    gen = StyleGAN2Generator(StyleGAN2Config(size=32, style_dim=512, n_mlp=8, channels=(16, 16, 16, 16))).eval()
    gen.w_avg.copy_(gen.estimate_w_avg(4096, seed=1))  # rosinality's mean_latent
    return gen


def _mapping_weights(gen: StyleGAN2Generator) -> list[torch.Tensor]:
    return [layer.weight for layer in list(gen.style)[1:]]


@torch.no_grad()
def test_stylegan2_mapping_starts_at_the_public_scale(stylegan2: StyleGAN2Generator) -> None:
    ws = stylegan2.mapping(_latents(4, 512, 2), psi=1)
    assert ws.shape == (4, 8, 512)
    _assert_realistic_mapping(_mapping_weights(stylegan2), ws, stylegan2.w_avg)


@torch.no_grad()
@pytest.mark.parametrize(("psi", "cutoff"), [(0.7, None), (0.5, 3), (0.0, None), (-0.5, 5), (0.7, 8)])
def test_stylegan2_truncation_follows_rosinality_and_nvlabs(stylegan2: StyleGAN2Generator, psi: float,
                                                            cutoff: int | None) -> None:
    z = _latents(4, 512, 2)
    ws = stylegan2.mapping(z, psi=1)
    expected = _public_formula(ws, stylegan2.w_avg, psi, cutoff)
    truncated = stylegan2.mapping(z, psi=psi, truncation_cutoff=cutoff)
    torch.testing.assert_close(truncated, expected, rtol=1e-5, atol=1e-6)
    assert (truncated - ws).abs().mean() > 0.05 * (1 - psi) * (cutoff or 8) / 8
    images = stylegan2(z, psi=psi, truncation_cutoff=cutoff)
    torch.testing.assert_close(images, stylegan2.synthesis(expected), rtol=0, atol=1e-4 * images.abs().max().item())
    assert (images - stylegan2(z, psi=1)).abs().mean() > 1e-2 * images.abs().mean()


@torch.no_grad()
def test_stylegan2_style_mixing_then_truncation_as_rosinality(stylegan2: StyleGAN2Generator) -> None:
    z, z2 = _latents(4, 512, 2), _latents(4, 512, 3)
    w, w2 = stylegan2.mapping(z, psi=1), stylegan2.mapping(z2, psi=1)
    # rosinality truncates each style, then takes layers < inject_index from the first
    mixed = torch.cat([w[:, :3], w2[:, 3:]], dim=1)
    expected = _public_formula(mixed, stylegan2.w_avg, 0.6, None)
    images = stylegan2(z, psi=0.6, mix_z=z2, inject_index=3)
    torch.testing.assert_close(images, stylegan2.synthesis(expected), rtol=0, atol=1e-4 * images.abs().max().item())
    assert (images - stylegan2(z, psi=0.6)).abs().mean() > 1e-2 * images.abs().mean()


@torch.no_grad()
def test_stylegan2_mapping_reproduces_nvlabs_truncation_at_its_initial_scale() -> None:
    with np.load(DATA / "truncation_sg2ada.npz", allow_pickle=False) as data:
        ref = {key: torch.from_numpy(data[key]) for key in data.files if key != "commit"}
    gen = StyleGAN2Generator(StyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels=(8, 8, 8, 8))).eval()
    for i in range(2):  # NVlabs mapping.fc{i} is rosinality style.{i + 1}
        gen.style[i + 1].weight.copy_(ref[f"fc{i}_weight"])
        gen.style[i + 1].bias.copy_(ref[f"fc{i}_bias"])
    gen.w_avg.copy_(ref["w_avg"])
    z = ref["z"]
    _assert_realistic_mapping(_mapping_weights(gen), ref["ws_psi1"], ref["w_avg"])
    torch.testing.assert_close(gen.mapping(z, psi=1), ref["ws_psi1"], rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.mapping(z, psi=0.5), ref["ws_psi0_5"], rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.mapping(z, psi=0.7, truncation_cutoff=3), ref["ws_psi0_7_cutoff3"],
                               rtol=0, atol=1e-5)
