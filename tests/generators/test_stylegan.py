"""StyleGAN (v1) in PyTorch against outputs of the official TF code on its own pickles.

Fixtures: ../shared/fixtures/generators/sg1_tf (tiny random-weight G_style/D_basic, 32 and 128 px).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.io.safe_pickle import PickledRecord, load_pickle
from patchscope.generators.stylegan.model import StyleGAN, StyleGANConfig
from patchscope.generators.stylegan.tf import load_stylegan_tf, load_stylegan_tf_file

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
SG1 = FIXTURES / "sg1_tf"
TF_TOLERANCE = 1e-4  # README: outputs of the TensorFlow references agree to about 1e-4
SIZES = (32, 128)

pytestmark = pytest.mark.skipif(not SG1.is_dir(), reason=f"StyleGAN fixtures not found at {SG1}")


def pickle_path(size: int) -> Path:
    return SG1 / f"sg1_tf_tiny{size}_nosrc.pkl"


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s}px")
def case(request: pytest.FixtureRequest) -> tuple[StyleGAN, dict[str, torch.Tensor]]:
    size = request.param
    io = np.load(SG1 / f"sg1_tf_tiny{size}_io.npz")
    return load_stylegan_tf_file(pickle_path(size)), {k: torch.from_numpy(io[k]) for k in io.files}


@pytest.fixture(scope="module")
def records32() -> tuple:
    return load_pickle(pickle_path(32))


def assert_matches_tf(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=TF_TOLERANCE, rtol=0)


# ---- the official outputs -------------------------------------------------------------

@torch.no_grad()
def test_mapping_reproduces_tf_dlatents(case):
    gen, io = case
    ws = gen.mapping(io["latents"], psi=1)
    # dlatents of these random nets are ~1e-3, so compare relative to their size as well.
    torch.testing.assert_close(ws, io["dlatents"], atol=1e-7, rtol=1e-4)


@torch.no_grad()
def test_untruncated_image_with_stored_noise_matches_tf(case):
    gen, io = case
    assert_matches_tf(gen(io["latents"], psi=1, noise_mode="const"), io["img_psi1"])


@torch.no_grad()
def test_default_sampling_truncates_psi07_on_first_8_layers_as_tf(case):
    gen, io = case
    assert (gen.psi, gen.truncation_cutoff, gen.noise_mode) == (0.7, 8, "const")
    assert_matches_tf(gen(io["latents"]), io["img_psi0.7_cutoff8"])


@torch.no_grad()
def test_synthesis_of_tf_dlatents_matches_tf(case):
    gen, io = case
    assert_matches_tf(gen.synthesis(io["dlatents"], noise_mode="const"), io["img_from_dlatents"])


@torch.no_grad()
def test_discriminator_scores_real_images_as_tf(case):
    gen, io = case
    assert_matches_tf(gen.discriminator(io["x_real"]), io["D_scores_real"])


def test_interface_facts_come_from_the_pickle(case):
    gen, io = case
    size = io["img_psi1"].shape[-1]
    assert (gen.latent_dim, gen.w_dim, gen.resolution, gen.format) == (16, 16, size, "stylegan_tf")
    assert gen.num_ws == io["dlatents"].shape[1] == 2 * int(np.log2(size)) - 2


def test_upsampling_is_fused_exactly_from_128px_as_official_auto_rule(case):
    gen, _ = case
    fused = {layer.noise_const.shape[-1] for layer in gen.synthesis_network.layers
             if layer.conv is not None and layer.conv.fused}
    assert fused == ({128} if gen.resolution == 128 else set())
    down_fused = [block.conv1_down.fused for block in gen.discriminator.blocks]
    assert down_fused == [gen.resolution >= 128] + [False] * (len(down_fused) - 1)


# ---- truncation, noise, latents -------------------------------------------------------

@torch.no_grad()
def test_psi_one_is_the_identity_of_truncation(case):
    gen, io = case
    z = io["latents"]
    plain = gen.mapping_network(z)[:, None].expand(-1, gen.num_ws, -1)
    torch.testing.assert_close(gen.mapping(z, psi=1, truncation_cutoff=8), plain, atol=0, rtol=0)
    truncated = gen.mapping(z, psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(truncated[:, 3:], plain[:, 3:], atol=0, rtol=0)
    torch.testing.assert_close(truncated[:, :3], (gen.w_avg + plain[:, :3]) / 2)


@torch.no_grad()
def test_random_noise_differs_between_calls_and_const_noise_is_deterministic(case):
    gen, io = case
    z = io["latents"][:2]
    const_a, const_b = gen(z, noise_mode="const"), gen(z, noise_mode="const")
    random_a, random_b = gen(z, noise_mode="random"), gen(z, noise_mode="random")
    none_a, none_b = gen(z, noise_mode="none"), gen(z, noise_mode="none")
    assert torch.equal(const_a, const_b) and torch.equal(none_a, none_b)
    assert not torch.allclose(random_a, random_b, atol=1e-3)
    assert not torch.allclose(const_a, none_a, atol=1e-3)
    assert not torch.allclose(const_a, random_a, atol=1e-3)


@torch.no_grad()
def test_noise_mode_option_sets_the_default(records32):
    io = np.load(SG1 / "sg1_tf_tiny32_io.npz")
    z = torch.from_numpy(io["latents"])
    gen = load_stylegan_tf(records32, noise_mode="none", psi=1.0)
    torch.testing.assert_close(gen(z), gen(z, noise_mode="none"), atol=0, rtol=0)
    assert not torch.allclose(gen(z), torch.from_numpy(io["img_psi1"]), atol=1e-3)


@torch.no_grad()
def test_sampled_image_depends_on_seed_and_index_not_on_batching(case):
    gen, _ = case
    latents = gen.sample_latents(3, seed=11)
    batch = gen(latents)
    for i in range(3):
        alone = gen.sample_latents(1, seed=11, start=i)
        assert torch.equal(alone[0], latents[i])
        # Batched and single convolutions may sum in another order: float32 noise only.
        torch.testing.assert_close(gen(alone)[0], batch[i], atol=TF_TOLERANCE, rtol=0)


@torch.no_grad()
def test_synthesis_broadcasts_a_single_w_to_every_layer(case):
    gen, io = case
    w = io["dlatents"][:, 0]
    torch.testing.assert_close(gen.synthesis(w), gen.synthesis(w[:, None].expand(-1, gen.num_ws, -1)))


@torch.no_grad()
def test_use_gs_false_loads_the_training_generator(records32):
    z = torch.from_numpy(np.load(SG1 / "sg1_tf_tiny32_io.npz")["latents"])
    averaged, trained = load_stylegan_tf(records32), load_stylegan_tf(records32, use_gs=False)
    assert not torch.allclose(averaged(z), trained(z), atol=1e-3)
    g_avg = dict(records32[0].state["variables"])["dlatent_avg"]
    np.testing.assert_array_equal(trained.w_avg.numpy(), g_avg)


@pytest.mark.parametrize("options", [
    {}, {"const_input_layer": False}, {"use_noise": False}, {"blur_filter": None},
    {"fused_scale": True, "nonlinearity": "relu"}, {"use_pixel_norm": True, "use_instance_norm": False},
], ids=lambda o: ",".join(o) or "defaults")
@torch.no_grad()
def test_randomly_initialised_variants_of_the_official_options_run(options):
    cfg = StyleGANConfig(resolution=16, latent_dim=8, w_dim=8, mapping_layers=2, mapping_fmaps=8,
                         fmap_base=32, fmap_max=8, **options)
    gen = StyleGAN(cfg)
    images = gen(torch.randn(2, 8))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert gen.num_ws == 6 and gen.discriminator is None
    # Without noise inputs every noise mode gives the same image.
    if not cfg.use_noise:
        z = torch.randn(2, 8)
        assert torch.equal(gen(z, noise_mode="random"), gen(z, noise_mode="const"))


# ---- safety and refusals --------------------------------------------------------------

def test_loading_imports_nothing_named_in_the_pickle():
    load_stylegan_tf_file(pickle_path(32))
    assert not any(name == "dnnlib" or name.startswith("dnnlib.") for name in sys.modules)


def test_progressive_gan_pickle_is_refused_with_one_clear_line():
    path = FIXTURES / "pgan_tf" / "pgan_tf_tiny32_nofused_nosrc.pkl"
    if not path.is_file():
        pytest.skip(f"PGAN TF fixture not found at {path}")
    with pytest.raises(CheckpointError) as info:
        load_stylegan_tf_file(path)
    message = str(info.value)
    assert str(path) in message and "G_style" in message and "G_paper" in message
    assert "\n" not in message


def test_non_network_pickle_is_refused():
    with pytest.raises(CheckpointError, match=r"^weights\.pkl: expected a StyleGAN \(v1\) TF network"):
        load_stylegan_tf({"state_dict": {}}, source="weights.pkl")


def edited_records(records: tuple, component: str, edit) -> tuple:
    """A copy of `(G, D, Gs)` whose Gs component has its variables passed through `edit`."""
    g, d, gs = records
    comp = gs.state["components"][component]
    new_comp = PickledRecord(comp.module, comp.name, state={**comp.state, "variables": edit(comp.state["variables"])})
    new_gs = PickledRecord(gs.module, gs.name, state={**gs.state, "components": {
        **gs.state["components"], component: new_comp}})
    return g, d, new_gs


def test_misshapen_variable_is_named_in_the_error(records32):
    def shrink(variables):
        return [(n, v[:, :8] if n == "Dense1/weight" else v) for n, v in variables]
    with pytest.raises(CheckpointError, match=r"'mapping/Dense1/weight' has shape \[16, 8\], expected \[16, 16\]"):
        load_stylegan_tf(edited_records(records32, "mapping", shrink))


def test_missing_and_unexpected_variables_are_refused(records32):
    def drop(variables):
        return [(n, v) for n, v in variables if n != "noise3"]
    with pytest.raises(CheckpointError, match=r"'synthesis/noise3' is missing"):
        load_stylegan_tf(edited_records(records32, "synthesis", drop))

    def add(variables):
        return list(variables) + [("LabelConcat/weight", np.zeros((2, 16), np.float32))]
    with pytest.raises(CheckpointError, match=r"unexpected variables.*mapping/LabelConcat/weight"):
        load_stylegan_tf(edited_records(records32, "mapping", add))


def test_network_still_growing_is_refused(records32):
    def grow(variables):
        return [(n, np.float32(0.5) if n == "lod" else v) for n, v in variables]
    with pytest.raises(CheckpointError, match=r"lod 0\.5"):
        load_stylegan_tf(edited_records(records32, "synthesis", grow))


# ---- written back (what finetuning saves) --------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_written_back_as_tf_variables_it_reloads_to_the_same_networks(size: int, tmp_path: Path) -> None:
    """save_stylegan_tf: every variable a finished network reads, bitwise in TF layout under its full TF name,
    with the static_kwargs of G, mapping, synthesis and D; load_generator rebuilds the same G, Gs and D."""
    from patchscope.generators.io.formats import load_generator
    from patchscope.generators.io.safe_pickle import load_torch
    from patchscope.generators.stylegan.tf import save_stylegan_tf

    gs, g = load_generator(pickle_path(size)), load_generator(pickle_path(size), use_gs=False)
    path = save_stylegan_tf(gs, tmp_path / "generator.pt", net_generator=g, discriminator=gs.discriminator)
    saved = load_torch(path)
    g_record, d_record, gs_record = load_pickle(pickle_path(size))
    components = gs_record.state["components"]
    original = {**{k: np.asarray(v) for k, v in gs_record.state["variables"]},
                **{f"{part}/{k}": np.asarray(v) for part in ("mapping", "synthesis")
                   for k, v in components[part].state["variables"]}}
    written = {k: v.numpy() for k, v in saved["Gs"]["variables"].items()}
    assert written.keys() <= original.keys() and len(written) > 10
    assert all(np.array_equal(written[k], original[k]) for k in written)
    # what is left out only serves progressive growing
    assert all("lod" in k.split("/")[-1] or "_lod" in k for k in original.keys() - written.keys())
    assert saved["Gs"]["static_kwargs"]["synthesis"] == components["synthesis"].state["static_kwargs"]
    assert saved["D"]["static_kwargs"] == d_record.state["static_kwargs"]
    gs2, g2 = load_generator(path), load_generator(path, use_gs=False)
    assert gs2.format == "stylegan_tf_torch" and torch.equal(gs2.w_avg, gs.w_avg)
    z = gs.sample_latents(2, seed=3)
    with torch.no_grad():
        assert torch.equal(gs2(z), gs(z)) and torch.equal(g2(z), g(z))
        images = gs(z)
        assert torch.equal(gs2.discriminator(images), gs.discriminator(images))


def test_truncation_works_under_bf16_autocast(case) -> None:
    """The mapping's output is bf16 under autocast, w_avg a float32 buffer: truncating must mix them."""
    generator, _ = case
    z = generator.sample_latents(2, seed=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = generator(z, psi=0.7)
    with torch.no_grad():
        reference = generator(z, psi=0.7)
    assert torch.isfinite(images.float()).all()
    assert float((images.float() - reference).abs().mean()) < 0.03  # bf16 rounding, not another image


def test_a_malformed_written_back_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    from patchscope.generators.io.formats import load_generator
    from patchscope.generators.io.safe_pickle import load_torch
    from patchscope.generators.stylegan.tf import save_stylegan_tf

    gs = load_generator(pickle_path(32))
    state = load_torch(save_stylegan_tf(gs, tmp_path / "ok.pt", net_generator=gs, discriminator=gs.discriminator))
    for name, broken in (("no_d", {k: v for k, v in state.items() if k != "D"}),
                         ("bad_kwargs", {**state, "Gs": {**state["Gs"], "static_kwargs": {"G": None}}}),
                         ("bad_shape", {**state, "Gs": {**state["Gs"], "variables": {
                             **state["Gs"]["variables"], "mapping/Dense0/weight": torch.zeros(2, 2)}}})):
        torch.save(broken, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError):
            load_generator(tmp_path / f"{name}.pt")
