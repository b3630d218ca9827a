"""Glow: exact agreement with y0ast Glow-PyTorch outputs, invertibility, log-determinants, loading rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator, openai_celebahq_config, quantize_pixels
from patchscope.generators.glow.y0ast import load_glow_y0ast, load_glow_y0ast_file

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
GLOW_DIR = FIXTURES / "glow_y0ast"
ATOL = 1e-5  # PyTorch-made fixtures, float32


def need_fixtures() -> None:
    if not GLOW_DIR.is_dir():
        pytest.skip(f"generator fixtures not found at {GLOW_DIR.resolve()}")


@pytest.fixture(scope="module")
def tiny() -> tuple[GlowGenerator, dict, dict]:
    need_fixtures()
    state = torch.load(GLOW_DIR / "glow_y0ast_tiny16.pt", map_location="cpu", weights_only=True)
    io = torch.load(GLOW_DIR / "glow_y0ast_tiny16_io.pt", map_location="cpu", weights_only=True)
    hparams = json.loads((GLOW_DIR / "glow_y0ast_tiny16_hparams.json").read_text())
    return load_glow_y0ast(state, hparams), io, hparams


def random_glow(config: GlowConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Glow:
    """A Glow whose every weight (zero convs and actnorm included) is moved off its init.

    The 1x1 convolutions move less: 0.1 noise on 48x48 LU factors gives condition numbers
    near 100, and float32 round trips would then test conditioning rather than the code.
    """
    torch.manual_seed(seed)
    glow = Glow(config).to(dtype)
    with torch.no_grad():
        for name, p in glow.named_parameters():
            p.add_((0.02 if ".invconv." in name else 0.1) * torch.randn_like(p))
    return glow.eval()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = 0.0) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --- the y0ast fixture -------------------------------------------------------------------------

def test_layout_inferred_from_keys_matches_fixture_hparams(tiny):
    gen, _, hp = tiny
    cfg = gen.glow.config
    assert (cfg.resolution, cfg.resolution, cfg.in_channels) == tuple(hp["image_shape"])
    assert (cfg.hidden_channels, cfg.steps, cfg.levels) == (hp["hidden_channels"], hp["K"], hp["L"])
    assert (cfg.coupling, cfg.permutation, cfg.lu_decomposed, cfg.learn_top) == (
        hp["flow_coupling"], hp["flow_permutation"], hp["LU_decomposed"], hp["learn_top"])
    assert gen.latent_dim == 48 * 2 * 2 and gen.resolution == 16 and gen.format == "glow_y0ast"


def test_state_dict_keys_equal_y0ast_layout(tiny):
    gen, _, _ = tiny
    state = torch.load(GLOW_DIR / "glow_y0ast_tiny16.pt", map_location="cpu", weights_only=True)
    ours = gen.glow.state_dict()
    assert list(ours) == list(state)
    assert all(torch.equal(ours[k], state[k]) for k in state)


@torch.no_grad()
def test_encode_reproduces_y0ast_latents_priors_and_splits(tiny):
    gen, io, _ = tiny
    enc = gen.glow.encode(io["x"])
    close(enc.z_top, io["z_top"])
    close(enc.prior_mean, io["prior_mean"])
    close(enc.prior_logs, io["prior_logs"])
    assert len(enc.splits) == len(io["splits"]) == 2
    for ours, ref in zip(enc.splits, io["splits"]):
        for name in ("z_in", "z1", "z2", "mean", "logs"):
            close(getattr(ours, name), ref[name])
    # A sum of ~1e3 over 768 dims: float32 rounding alone is ~1e-4, so compare relatively.
    close(enc.logdet_plus_split_logp, io["logdet_plus_split_logp"], rtol=1e-6)


@torch.no_grad()
def test_decode_at_temperature_zero_reproduces_y0ast_reconstruction(tiny):
    gen, io, _ = tiny
    close(gen.glow.decode(io["z_top"], temperature=0.0), io["x_rec_from_z_top_T0"])


@torch.no_grad()
def test_decode_of_encode_with_encoded_splits_returns_the_input(tiny):
    gen, io, _ = tiny
    enc = gen.glow.encode(io["x"])
    close(gen.glow.decode(enc.z_top, temperature=0.7, eps=enc.eps), io["x"])


@torch.no_grad()
def test_generator_places_rows_under_top_prior_and_scales_images_by_two(tiny):
    gen, _, _ = tiny
    z = gen.sample_latents(3, seed=5)
    noise = gen.sample_split_noise(3, seed=5)
    images = gen(z, temperature=0.6, split_noise=noise)
    assert images.shape == (3, 3, 16, 16)
    enc = gen.glow.encode(images / 2)
    expected_top = enc.prior_mean + torch.exp(enc.prior_logs) * 0.6 * z.reshape(3, 48, 2, 2)
    close(enc.z_top, expected_top, atol=1e-4)
    for eps, n in zip(enc.eps, noise):
        close(eps, 0.6 * n, atol=1e-4)


@torch.no_grad()
def test_temperature_zero_is_deterministic_and_ignores_latents_and_rng(tiny):
    gen, _, _ = tiny
    torch.manual_seed(1)
    a = gen(gen.sample_latents(2, seed=0), temperature=0.0)
    torch.manual_seed(2)
    b = gen(gen.sample_latents(2, seed=9), temperature=0.0)
    assert torch.equal(a, b)
    c = gen(gen.sample_latents(2, seed=0), temperature=0.7)
    d = gen(gen.sample_latents(2, seed=0), temperature=0.7)
    assert not torch.equal(c, d)  # splits drawn afresh at a positive temperature


def test_split_noise_row_depends_only_on_seed_and_index(tiny):
    gen, _, _ = tiny
    batch = gen.sample_split_noise(4, seed=3)
    single = gen.sample_split_noise(1, seed=3, start=2)
    assert [tuple(t.shape[1:]) for t in batch] == gen.split_shapes == [(6, 8, 8), (12, 4, 4)]
    assert all(torch.equal(b[2:3], s) for b, s in zip(batch, single))
    assert not torch.equal(batch[0][0].flatten()[:5], gen.sample_latents(1, seed=3)[0, :5])


def test_file_loader_reads_fixture_with_its_hparams(tiny):
    gen, io, _ = tiny
    loaded = load_glow_y0ast_file(GLOW_DIR / "glow_y0ast_tiny16.pt", GLOW_DIR / "glow_y0ast_tiny16_hparams.json",
                                  temperature=0.5)
    assert loaded.temperature == 0.5 and loaded.glow.config == gen.glow.config
    with torch.no_grad():
        close(loaded.glow.decode(io["z_top"], 0.0), io["x_rec_from_z_top_T0"])


# --- loader errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("K", 4), ("flow_coupling", "affine"), ("LU_decomposed", True),
                                          ("image_shape", [32, 32, 3])])
def test_hparams_that_disagree_with_weights_are_refused_by_name(tiny, field, value):
    _, _, hp = tiny
    state = torch.load(GLOW_DIR / "glow_y0ast_tiny16.pt", map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match=rf"{field}: hparams {value!r}".replace("[", r"\[")):
        load_glow_y0ast(state, {**hp, field: value})


def test_missing_weight_is_refused_as_checkpoint_error(tiny):
    state = torch.load(GLOW_DIR / "glow_y0ast_tiny16.pt", map_location="cpu", weights_only=True)
    del state["flow.layers.5.block.2.actnorm.logs"]
    with pytest.raises(CheckpointError, match="flow.layers.5.block.2.actnorm.logs"):
        load_glow_y0ast(state, source="cut.pt")


def test_missing_or_foreign_files_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        load_glow_y0ast_file(tmp_path / "nope.pt")
    foreign = tmp_path / "other.pt"
    torch.save({"netG.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="other.pt: expected a y0ast Glow state dict"):
        load_glow_y0ast_file(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable torch state dict"):
        load_glow_y0ast_file(garbage)


def test_reverse_permutation_needs_hparams_and_shuffle_is_refused():
    config = GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2, permutation="reverse")
    glow = random_glow(config)
    state = glow.state_dict()
    assert not any("invconv" in k for k in state)
    with pytest.raises(CheckpointError, match="no invconv weights"):
        load_glow_y0ast(state)
    with pytest.raises(CheckpointError, match="shuffle"):
        load_glow_y0ast(state, {"flow_permutation": "shuffle"})
    loaded = load_glow_y0ast(state, {"flow_permutation": "reverse", "LU_decomposed": True})
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        close(loaded.glow.encode(x).z_top, glow.encode(x).z_top, atol=0.0)


# --- the full-size openai layout ---------------------------------------------------------------

def test_openai_celebahq_config_builds_the_published_key_layout_on_meta():
    need_fixtures()
    keys = json.loads((FIXTURES / "keys" / "fullsize_keys.json").read_text())
    expected = keys["glow_y0ast_celebahq256_openai_hparams"]
    with torch.device("meta"):
        glow = Glow(openai_celebahq_config())
    state = glow.state_dict()
    first = {k: list(v.shape) for k, v in list(state.items())[:len(expected["first_keys"])]}
    assert list(first.items()) == list(expected["first_keys"].items())
    assert sum(v.numel() for v in state.values()) == expected["n_params"]
    assert state["prior_h"].shape == (1, 768, 4, 4)


def test_full_size_weights_are_inferred_back_to_the_openai_config():
    with torch.device("meta"):
        state = Glow(openai_celebahq_config()).state_dict()
    gen = load_glow_y0ast(state, n_bits=5)
    assert gen.glow.config == openai_celebahq_config()
    assert gen.latent_dim == 384 * 4 * 4 and gen.resolution == 256


# --- invertibility and log-determinants on random weights ---------------------------------------

VARIANTS = {
    "affine_lu": dict(coupling="affine", permutation="invconv", lu_decomposed=True),
    "additive_plain": dict(coupling="additive", permutation="invconv", lu_decomposed=False),
    "affine_reverse": dict(coupling="affine", permutation="reverse", lu_decomposed=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_random_weights_decode_of_encode_returns_input(variant):
    glow = random_glow(GlowConfig(resolution=16, hidden_channels=8, steps=3, levels=3, **VARIANTS[variant]))
    x = torch.rand(2, 3, 16, 16) - 0.5
    enc = glow.encode(x)
    close(glow.decode(enc.z_top, temperature=1.0, eps=enc.eps), x, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logdet_equals_log_abs_det_of_numerical_jacobian(variant):
    # Two levels on 4x4x3: x (48 dims) -> (z2 of the split, z_top) is a bijection of R^48.
    glow = random_glow(GlowConfig(resolution=4, hidden_channels=6, steps=2, levels=2, **VARIANTS[variant]),
                       dtype=torch.float64)
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64) - 0.5

    def latents(flat: torch.Tensor) -> torch.Tensor:
        enc = glow.encode(flat.reshape(1, 3, 4, 4))
        return torch.cat([enc.splits[0].z2.flatten(), enc.z_top.flatten()])

    jacobian = torch.autograd.functional.jacobian(latents, x.flatten())
    assert jacobian.shape == (48, 48)
    with torch.no_grad():
        logdet = glow.encode(x).logdet
    close(logdet, torch.linalg.slogdet(jacobian)[1].reshape(1), atol=1e-8)


@torch.no_grad()
def test_fresh_glow_is_standard_normal_so_bits_per_dim_has_closed_form():
    # At init actnorm is identity, zero convs output 0 and W is orthogonal: z is a rotation of x
    # and every prior is N(0, 1), so log p(x) = -|x|^2/2 - D/2 log(2 pi).
    torch.manual_seed(0)
    glow = Glow(GlowConfig(resolution=8, hidden_channels=8, steps=2, levels=2, coupling="additive",
                           lu_decomposed=False, n_bits=5))
    x = quantize_pixels(torch.randint(0, 256, (3, 3, 8, 8)), n_bits=5)
    dims = 3 * 8 * 8
    log_density = -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * dims * math.log(2 * math.pi)
    close(glow.encode(x).log_density, log_density, atol=1e-3)
    expected_bpd = -(log_density - dims * math.log(32)) / (dims * math.log(2))
    close(glow.bits_per_dim(x, dequantize=False), expected_bpd, atol=1e-5)
    noisy = glow.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, expected_bpd, atol=1e-4)  # the noise moved x within its bins


def test_quantize_pixels_keeps_top_bits_in_half_open_unit_interval():
    pixels = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    assert quantize_pixels(pixels, 5).tolist() == [-0.5, -0.5, 1 / 32 - 0.5, 31 / 32 - 0.5]
    assert quantize_pixels(pixels, 8).tolist() == [(p / 256) - 0.5 for p in (0, 7, 8, 255)]
