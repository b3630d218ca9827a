"""PGAN loaders reproduce what pytorch_GAN_zoo and the official TF code computed, and zoo
checkpoints written by `save_pgan_zoo` read back identically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.generators import CheckpointError, load_generator
from patchscope.generators.io.safe_pickle import load_pickle, load_torch
from patchscope.generators.pgan.tf import TF_NETWORKS, PGANTFGenerator, save_pgan_tf
from patchscope.generators.pgan.zoo import PGANZooGenerator, build_pgan_zoo, save_pgan_zoo

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
ZOO = FIXTURES / "pgan_zoo"
TF = FIXTURES / "pgan_tf"

# The zoo images carry float32 round-off of ~2e-5 (values up to ~4): evaluating our network
# in float64 lands 2.25e-5 from the stored float32 output, as far as our float32 run does.
ZOO_IMAGE_ATOL = 5e-5
ROUNDOFF_ATOL = 5e-5  # same network, different batch size: different conv summation order
ZOO_D_ATOL = 1e-5
TF_ATOL = 1e-4

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"generator fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def zoo_io() -> dict:
    return load_torch(ZOO / "pgan_zoo_tiny_s3_io.pt")


def _max_error(actual: torch.Tensor, expected: torch.Tensor | np.ndarray) -> float:
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape
    return (actual.detach() - expected).abs().max().item()


@pytest.mark.parametrize("checkpoint", ["pgan_zoo_tiny_s3.pt", "pgan_zoo_tiny_s3_dictconfig.pt"])
def test_zoo_generators_reproduce_stored_images(checkpoint: str, zoo_io: dict) -> None:
    averaged = load_generator(ZOO / checkpoint)
    trained = load_generator(ZOO / checkpoint, use_avg=False)
    assert isinstance(averaged, PGANZooGenerator) and averaged.format == "pgan_zoo"
    assert (averaged.latent_dim, averaged.resolution) == (16, 32)
    z = zoo_io["z"]
    with torch.no_grad():
        assert _max_error(trained(z), zoo_io["G_out_alpha0"]) < ZOO_IMAGE_ATOL
        assert _max_error(trained(z), zoo_io["test_getAvG_false"]) < ZOO_IMAGE_ATOL
        assert _max_error(averaged(z), zoo_io["avgG_out_alpha0"]) < ZOO_IMAGE_ATOL
        assert _max_error(averaged(z), zoo_io["test_getAvG_true"]) < ZOO_IMAGE_ATOL
        assert _max_error(trained(z, alpha=0.3), zoo_io["G_out_alpha0.3"]) < ZOO_IMAGE_ATOL
        # netG and avgG really differ, so the option picks a network
        assert _max_error(averaged(z), zoo_io["G_out_alpha0"]) > 1e-2


@pytest.mark.parametrize("checkpoint", ["pgan_zoo_tiny_s3.pt", "pgan_zoo_tiny_s3_dictconfig.pt"])
def test_zoo_discriminator_reproduces_scores_and_features(checkpoint: str, zoo_io: dict) -> None:
    discriminator = load_generator(ZOO / checkpoint).discriminator
    with torch.no_grad():
        scores, features = discriminator(zoo_io["x_real"], return_features=True)
        assert _max_error(scores, zoo_io["D_out_real_alpha0"]) < ZOO_D_ATOL
        assert _max_error(features, zoo_io["D_feat_real_alpha0"]) < ZOO_D_ATOL
        assert _max_error(discriminator(zoo_io["G_out_alpha0"]), zoo_io["D_out_fake_alpha0"]) < ZOO_D_ATOL
        blended = discriminator(zoo_io["x_real"], alpha=0.3)
        assert _max_error(blended, zoo_io["D_out_real_alpha0.3"]) < ZOO_D_ATOL


def test_zoo_discriminator_score_depends_on_the_whole_batch(zoo_io: dict) -> None:
    discriminator = load_generator(ZOO / "pgan_zoo_tiny_s3.pt").discriminator
    with torch.no_grad():
        alone = discriminator(zoo_io["x_real"][:1])
        together = discriminator(zoo_io["x_real"])[:1]
    assert not torch.allclose(alone, together, atol=1e-4)


@pytest.mark.parametrize("variant", ["nofused", "fused"])
def test_tf_pgan_reproduces_gs_g_and_d(variant: str) -> None:
    io = np.load(TF / f"pgan_tf_tiny32_{variant}_io.npz")
    gs = load_generator(TF / f"pgan_tf_tiny32_{variant}_nosrc.pkl")
    g = load_generator(TF / f"pgan_tf_tiny32_{variant}_nosrc.pkl", use_avg=False)
    assert isinstance(gs, PGANTFGenerator) and gs.format == "pgan_tf"
    assert (gs.latent_dim, gs.resolution, gs.fused_scale) == (16, 32, variant == "fused")
    latents = torch.from_numpy(io["latents"])
    with torch.no_grad():
        assert _max_error(gs(latents), io["img_Gs"]) < TF_ATOL
        assert _max_error(g(latents), io["img_G"]) < TF_ATOL
        scores = gs.discriminator(torch.from_numpy(io["x_real"]))
        assert _max_error(scores, io["D_scores_real"]) < TF_ATOL


@pytest.mark.parametrize("variant", ["nofused", "fused"])
def test_tf_pgan_written_back_holds_the_pickles_variables_exactly(variant: str, tmp_path: Path) -> None:
    """save_pgan_tf (what finetuning writes for a TF PGAN): every TF variable under its TF name, bitwise in TF
    layout, with the static_kwargs; read back by load_generator into the same networks."""
    source = TF / f"pgan_tf_tiny32_{variant}_nosrc.pkl"
    gs, g = load_generator(source), load_generator(source, use_avg=False)
    path = save_pgan_tf(gs, tmp_path / "generator.pt", net_generator=g, discriminator=gs.discriminator)
    saved = load_torch(path)
    for role, record in zip(TF_NETWORKS, load_pickle(source)):
        original = {name: np.asarray(value) for name, value in record.attr("variables")}
        written = {name: value.numpy() for name, value in saved[role]["variables"].items()}
        assert written.keys() == original.keys()
        assert all(np.array_equal(written[name], original[name]) for name in original), role
        assert saved[role]["static_kwargs"] == record.attr("static_kwargs")
    gs2, g2 = load_generator(path), load_generator(path, use_avg=False)
    assert isinstance(gs2, PGANTFGenerator) and gs2.format == "pgan_tf_torch" and gs2.fused_scale == gs.fused_scale
    latents = gs.sample_latents(3, seed=2)
    with torch.no_grad():
        assert torch.equal(gs2(latents), gs(latents)) and torch.equal(g2(latents), g(latents))
        images = gs(latents)
        assert torch.equal(gs2.discriminator(images), gs.discriminator(images))


def test_a_tf_pgan_file_missing_a_network_is_a_checkpoint_error(tmp_path: Path) -> None:
    gs = load_generator(TF / "pgan_tf_tiny32_fused_nosrc.pkl")
    path = save_pgan_tf(gs, tmp_path / "generator.pt", net_generator=gs, discriminator=gs.discriminator)
    state = load_torch(path)
    del state["D"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="lacks the network"):
        load_generator(tmp_path / "broken.pt")


def test_tf_pgan_alpha_blends_toward_the_upsampled_previous_scale() -> None:
    gs = load_generator(TF / "pgan_tf_tiny32_nofused_nosrc.pkl")
    latents = gs.sample_latents(2, seed=1)
    with torch.no_grad():
        full, half, coarse = gs(latents, alpha=0.0), gs(latents, alpha=0.5), gs(latents, alpha=1.0)
    torch.testing.assert_close(half, 0.5 * (full + coarse), atol=1e-5, rtol=0)
    # at alpha 1 the 32 px output is the 16 px image upsampled: constant 2x2 blocks
    torch.testing.assert_close(coarse[..., ::2, ::2], coarse[..., 1::2, 1::2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("resolution", [256, 512])
def test_zoo_architecture_matches_published_full_size_keys(resolution: int) -> None:
    published = json.loads((FIXTURES / "keys" / "fullsize_keys.json").read_text())
    expected = published[f"pgan_zoo_{resolution}_default_depths"]
    with torch.device("meta"):
        generator, discriminator = build_pgan_zoo(resolution)
    shapes = lambda module: {k: list(v.shape) for k, v in module.state_dict().items()}  # noqa: E731
    assert list(shapes(generator).items()) == list(expected["netG"].items())
    assert list(shapes(discriminator).items()) == list(expected["netD"].items())
    assert sum(p.numel() for p in generator.parameters()) == expected["n_params_G"]
    assert sum(p.numel() for p in discriminator.parameters()) == expected["n_params_D"]


def test_saved_zoo_checkpoint_reads_back_identically(tmp_path: Path, zoo_io: dict) -> None:
    original = load_generator(ZOO / "pgan_zoo_tiny_s3.pt")
    trained = load_generator(ZOO / "pgan_zoo_tiny_s3.pt", use_avg=False)
    path = save_pgan_zoo(original, tmp_path / "resaved.pt", net_generator=trained)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resaved.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True, map_location="cpu")  # plain dict config: no allow-list
    fixture = load_torch(ZOO / "pgan_zoo_tiny_s3.pt")
    assert set(raw) == {"config", "netG", "netD", "avgG"}
    for part in ("netG", "netD", "avgG"):
        assert list(raw[part]) == list(fixture[part])
        assert all(torch.equal(raw[part][k], fixture[part][k]) for k in fixture[part])
    reloaded = load_generator(path)
    with torch.no_grad():
        assert torch.equal(reloaded(zoo_io["z"]), original(zoo_io["z"]))
        assert torch.equal(reloaded.discriminator(zoo_io["x_real"]), original.discriminator(zoo_io["x_real"]))
        assert torch.equal(load_generator(path, use_avg=False)(zoo_io["z"]), trained(zoo_io["z"]))


def test_freshly_built_small_pgan_round_trips_through_the_zoo_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generator, discriminator = build_pgan_zoo(16, latent_dim=8, depth_scale0=8, depth_other_scales=[8, 4])
    generator.discriminator = discriminator
    path = save_pgan_zoo(generator, tmp_path / "small.pt", extra_config={"learningRate": 0.003})
    reloaded = load_generator(path)
    z = generator.sample_latents(3, seed=0)
    with torch.no_grad():
        assert torch.equal(reloaded(z), generator(z))
        assert torch.equal(reloaded(z, alpha=0.4), generator(z, alpha=0.4))
        images = torch.rand(4, 3, 16, 16) * 2 - 1
        assert torch.equal(reloaded.discriminator(images, alpha=0.4), discriminator(images, alpha=0.4))
    assert load_torch(path)["config"]["learningRate"] == 0.003


def test_saving_without_a_discriminator_is_refused(tmp_path: Path) -> None:
    generator, _ = build_pgan_zoo(8, latent_dim=4, depth_scale0=4, depth_other_scales=[4])
    with pytest.raises(ValueError, match="discriminator"):
        save_pgan_zoo(generator, tmp_path / "no_d.pt")


def test_zoo_file_with_a_missing_layer_is_named_in_one_line(tmp_path: Path) -> None:
    state = load_torch(ZOO / "pgan_zoo_tiny_s3_dictconfig.pt")
    del state["avgG"]["toRGBLayers.3.module.bias"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    message = str(caught.value)
    assert str(path) in message and "toRGBLayers.3.module.bias" in message and "\n" not in message


@pytest.mark.parametrize("checkpoint", [ZOO / "pgan_zoo_tiny_s3.pt", TF / "pgan_tf_tiny32_fused_nosrc.pkl"])
def test_image_n_depends_only_on_seed_and_index(checkpoint: Path) -> None:
    generator = load_generator(checkpoint)
    batch = generator.sample_latents(6, seed=7)
    slice_ = generator.sample_latents(2, seed=7, start=3)
    assert torch.equal(batch[3:5], slice_)
    with torch.no_grad():
        # equal up to float32 round-off, which differs with the batch size's conv kernels
        torch.testing.assert_close(generator(batch)[3:5], generator(slice_), atol=ROUNDOFF_ATOL, rtol=0)
        assert not torch.allclose(generator(batch)[0], generator(batch)[1])


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="psi"):
        load_generator(ZOO / "pgan_zoo_tiny_s3.pt", psi=0.7)


def _tf_style_pickle(monkeypatch: pytest.MonkeyPatch, networks: tuple) -> bytes:
    """Pickle `(G, D, Gs)` states the way TF's `tfutil.Network` does, with a stand-in class."""
    import pickle
    import sys
    import types

    module = types.ModuleType("tfutil")

    class Network:
        def __init__(self, state: dict) -> None:
            self.state = state

        def __getstate__(self) -> dict:
            return self.state

    Network.__module__, Network.__qualname__ = "tfutil", "Network"
    module.Network = Network
    monkeypatch.setitem(sys.modules, "tfutil", module)
    return pickle.dumps(tuple(Network(state) for state in networks))


def test_tf_pickle_missing_a_variable_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from patchscope.generators.io.safe_pickle import load_pickle

    g, d, gs = load_pickle(TF / "pgan_tf_tiny32_fused_nosrc.pkl")
    broken_gs = dict(gs.state, variables=[(k, v) for k, v in gs.attr("variables") if k != "16x16/Conv1/bias"])
    path = tmp_path / "karras2018.pkl"
    path.write_bytes(_tf_style_pickle(monkeypatch, (g.state, d.state, broken_gs)))
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    message = str(caught.value)
    assert str(path) in message and "16x16/Conv1/bias" in message and "\n" not in message
    assert load_generator(path, use_avg=False).resolution == 32  # G itself is intact


def test_zoo_minibatch_stddev_follows_the_zoo_grouping_for_eight_samples() -> None:
    from patchscope.generators.pgan.zoo import zoo_minibatch_stddev

    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = zoo_minibatch_stddev(x)
    # contiguous groups (the zoo's x.view(-1, 4, C, H, W)): group g = samples 4g .. 4g+3 (unbiased
    # std, averaged), written to the same rows; tests/generators/test_minibatch_stddev.py has the zoo's output
    for group in range(2):
        expected = (x[4 * group: 4 * group + 4].var(dim=0, unbiased=True) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[4 * group: 4 * group + 4, 2], expected.expand(4, 4, 4))
    torch.testing.assert_close(out[:, :2], x)
    assert torch.equal(zoo_minibatch_stddev(x[:1])[:, 2], torch.zeros(1, 4, 4))


def test_tf_minibatch_stddev_uses_biased_variance_and_strided_groups() -> None:
    from patchscope.generators.pgan.tf import tf_minibatch_stddev

    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = tf_minibatch_stddev(x, group_size=4)
    for sample in range(8):
        members = x[sample % 2::2]
        expected = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[sample, 2], expected.expand(4, 4))
