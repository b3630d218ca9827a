"""StyleGAN2 in pure PyTorch against rosinality's and NVlabs' own outputs on their own checkpoints.

Fixtures: ../shared/fixtures/generators/{sg2_rosinality, sg2ada, keys} (tiny random-weight 32 px nets).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.io.safe_pickle import PickledRecord, load_pickle, load_torch
from patchscope.generators.stylegan2.layers import BiasedLeakyReLU, ToRGB
from patchscope.generators.stylegan2.model import (
    StyleGAN2Config, StyleGAN2Discriminator, StyleGAN2Generator, export_rosinality, load_rosinality,
    load_rosinality_file, nvlabs_channels, rosinality_channels,
)
from patchscope.generators.stylegan2.nvlabs import (
    load_nvlabs, load_nvlabs_file, nvlabs_to_rosinality_discriminator, nvlabs_to_rosinality_generator,
    read_network, rosinality_to_nvlabs_discriminator, rosinality_to_nvlabs_generator,
)

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
ROS = FIXTURES / "sg2_rosinality"
NV = FIXTURES / "sg2ada"
TOLERANCE = 1e-5  # README: outputs of the PyTorch references agree to about 1e-5

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"generator fixtures not found at {FIXTURES}")


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def ros_io() -> dict:
    return load_torch(ROS / "sg2_rosinality_tiny32_io.pt")


@pytest.fixture(scope="module")
def ros_train() -> dict:
    return load_torch(ROS / "sg2_rosinality_tiny32.pt")


@pytest.fixture(scope="module")
def ros_ema(ros_train, ros_io) -> StyleGAN2Generator:
    # the train layout stores no latent_avg; the fixture's is the reference's mean_latent
    return load_rosinality(ros_train, w_avg=ros_io["latent_avg"])


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return load_pickle(NV / "sg2ada_tiny32_nosrc.pkl")


@pytest.fixture(scope="module")
def nv_io() -> dict:
    return load_torch(NV / "sg2ada_tiny32_io.pt")


@pytest.fixture(scope="module")
def nv_reference() -> dict:
    return load_torch(NV / "sg2ada_tiny32_state_dicts.pt")


@pytest.fixture(scope="module")
def nv_gen(snapshot) -> StyleGAN2Generator:
    return load_nvlabs(snapshot)


@pytest.fixture(scope="module")
def full_keys() -> dict:
    return json.loads((FIXTURES / "keys" / "fullsize_keys.json").read_text())


def shapes(state: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def with_kwargs(record: PickledRecord, update) -> PickledRecord:
    """A copy of a persistent-object record whose `_init_kwargs` went through `update`."""
    meta = record.args[0]
    kwargs = copy.deepcopy(meta["state"]["_init_kwargs"])
    update(kwargs)
    return PickledRecord(record.module, record.name, ({**meta, "state": {**meta["state"], "_init_kwargs": kwargs}},))


# ---- rosinality: every stored output ----------------------------------------------------------

@torch.no_grad()
def test_rosinality_ema_with_given_noise_matches_reference(ros_ema, ros_io):
    assert_matches(ros_ema(ros_io["z"], noise=ros_io["noise"]), ros_io["img_ema_fixed_noise"])


@torch.no_grad()
def test_rosinality_const_noise_uses_the_stored_noise_buffers(ros_ema, ros_io):
    assert_matches(ros_ema(ros_io["z"], noise_mode="const"), ros_io["img_ema_const_noise_buffers"])


@torch.no_grad()
def test_converter_layout_truncates_toward_its_latent_avg(ros_io):
    gen = load_rosinality(load_torch(ROS / "sg2_rosinality_tiny32_converted_style.pt"))
    assert gen.w_avg_source == "checkpoint latent_avg"
    assert_matches(gen(ros_io["z"], psi=0.7, noise=ros_io["noise"]), ros_io["img_ema_trunc0.7"])


@torch.no_grad()
def test_mapping_gives_the_reference_w(ros_ema, ros_io):
    assert_matches(ros_ema.mapping(ros_io["z"]), ros_io["w_plus"])
    assert_matches(ros_ema.mapping(ros_io["z"])[:, 0], ros_io["w"])


@torch.no_grad()
@pytest.mark.parametrize("key", ["w", "w_plus"])
def test_input_is_w_matches_reference_for_w_and_w_plus(ros_ema, ros_io, key):
    assert_matches(ros_ema(ros_io[key], input_is_w=True, noise=ros_io["noise"]), ros_io["img_ema_from_w"])


@torch.no_grad()
def test_style_mixing_at_layer_3_matches_reference(ros_ema, ros_io):
    out = ros_ema(ros_io["z"], mix_z=ros_io["z2"], inject_index=3, noise=ros_io["noise"])
    assert_matches(out, ros_io["img_ema_mix_inject3"])


@torch.no_grad()
def test_use_ema_false_loads_the_raw_generator_g(ros_train, ros_io):
    gen = load_rosinality(ros_train, use_ema=False)
    assert_matches(gen(ros_io["z"], noise=ros_io["noise"]), ros_io["img_g_fixed_noise"])


@torch.no_grad()
def test_rosinality_discriminator_scores_real_and_generated_images(ros_ema, ros_io):
    assert_matches(ros_ema.discriminator(ros_io["x_real"]), ros_io["d_real"])
    # the reference scored its 3 fixed-noise images padded to a group of 4 with the first one
    z4 = torch.cat([ros_io["z"], ros_io["z"][:1]])
    assert_matches(ros_ema.discriminator(ros_ema(z4, noise=ros_io["noise"])), ros_io["d_fake"])


@torch.no_grad()
def test_missing_latent_avg_is_estimated_from_fixed_seed_latents(ros_train):
    gen = load_rosinality(ros_train, with_discriminator=False)
    assert gen.w_avg_source.startswith("estimated")
    torch.testing.assert_close(gen.w_avg, gen.estimate_w_avg(), rtol=0, atol=0)
    assert gen.discriminator is None


@torch.no_grad()
def test_exported_converter_layout_loads_back_to_the_same_model(ros_ema, ros_io, tmp_path):
    path = tmp_path / "sg2.pt"
    torch.save(export_rosinality(ros_ema), path)
    back = load_rosinality_file(path)
    assert back.format == "rosinality"
    torch.testing.assert_close(back(ros_io["z"]), ros_ema(ros_io["z"]), rtol=0, atol=0)
    torch.testing.assert_close(back(ros_io["z"], psi=0.5), ros_ema(ros_io["z"], psi=0.5), rtol=0, atol=0)
    torch.testing.assert_close(back.discriminator(ros_io["x_real"]), ros_io["d_real"], rtol=0, atol=TOLERANCE)


# ---- NVlabs: the safe reader and the stored outputs -------------------------------------------

@pytest.mark.parametrize("part,kwargs_key", [("G_ema", "G_kwargs"), ("D", "D_kwargs")])
def test_records_give_exactly_the_reference_state_dicts_and_kwargs(snapshot, nv_reference, part, kwargs_key):
    net = read_network(snapshot[part], "sg2ada", part)
    expected = nv_reference[part]
    assert list(net.state_dict) == list(expected)
    for key, value in expected.items():
        assert torch.equal(net.state_dict[key], value), key
        assert type(net.state_dict[key]) is torch.Tensor, key
    assert net.init_kwargs == nv_reference[kwargs_key]
    assert net.class_name == {"G_ema": "Generator", "D": "Discriminator"}[part]


@torch.no_grad()
def test_nvlabs_mapping_gives_the_reference_ws(nv_gen, nv_io):
    assert nv_gen.w_avg_source == "checkpoint mapping.w_avg"
    assert_matches(nv_gen.mapping(nv_io["z"]), nv_io["ws"])


@torch.no_grad()
@pytest.mark.parametrize("opts,key", [({"noise_mode": "const"}, "img_const_noise"),
                                      ({"psi": 0.7}, "img_psi0.7"),
                                      ({"noise_mode": "none"}, "img_none_noise")])
def test_nvlabs_images_match_reference(nv_gen, nv_io, opts, key):
    assert_matches(nv_gen(nv_io["z"], **opts), nv_io[key])


@torch.no_grad()
def test_nvlabs_synthesis_from_stored_ws_matches_reference(nv_gen, nv_io):
    assert_matches(nv_gen.synthesis(nv_io["ws"], noise_mode="const"), nv_io["img_const_noise"])


@torch.no_grad()
def test_nvlabs_discriminator_matches_reference(nv_gen, nv_io):
    assert_matches(nv_gen.discriminator(nv_io["x_real"]), nv_io["d_real"])


def test_nvlabs_use_ema_false_loads_G_not_G_ema(snapshot):
    raw = load_nvlabs(snapshot, use_ema=False, with_discriminator=False)
    expected, _ = nvlabs_to_rosinality_generator(read_network(snapshot["G"]).state_dict)
    ema, _ = nvlabs_to_rosinality_generator(read_network(snapshot["G_ema"]).state_dict)
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in expected.items())
    assert not all(torch.equal(expected[k], ema[k]) for k in expected)


def test_key_maps_round_trip_the_nvlabs_state_dicts_exactly(nv_reference):
    g_state, w_avg = nvlabs_to_rosinality_generator(nv_reference["G_ema"])
    back = rosinality_to_nvlabs_generator(g_state, w_avg)
    assert list(back) == list(nv_reference["G_ema"])
    assert all(torch.equal(back[k], v) for k, v in nv_reference["G_ema"].items())
    d_back = rosinality_to_nvlabs_discriminator(nvlabs_to_rosinality_discriminator(nv_reference["D"]))
    assert list(d_back) == list(nv_reference["D"])
    assert all(torch.equal(d_back[k], v) for k, v in nv_reference["D"].items())


@torch.no_grad()
def test_conv_clamp_kwarg_clamps_every_conv_output_as_nvlabs_does(snapshot, nv_io):
    clamp = 0.05
    clamped = {**snapshot,
               "G_ema": with_kwargs(snapshot["G_ema"], lambda kw: kw["synthesis_kwargs"].update(conv_clamp=clamp)),
               "D": with_kwargs(snapshot["D"], lambda kw: kw.update(conv_clamp=clamp))}
    free, gen = load_nvlabs(snapshot), load_nvlabs(clamped)
    peaks: dict[str, list[float]] = {"free": [], "clamped": []}
    for name, model in (("free", free), ("clamped", gen)):
        for module in model.modules():  # the attached discriminator included
            if isinstance(module, BiasedLeakyReLU):
                module.register_forward_hook(lambda m, i, o, n=name: peaks[n].append(o.abs().max().item()))
        model(nv_io["z"])
        model.discriminator(nv_io["x_real"])
    assert gen.config.conv_clamp == clamp and gen.nvlabs_kwargs["synthesis_kwargs"]["conv_clamp"] == clamp
    assert len(peaks["clamped"]) == len(peaks["free"]) > 0
    assert max(peaks["free"]) > clamp and max(peaks["clamped"]) <= float(torch.tensor(clamp))  # in float32
    assert not torch.allclose(gen(nv_io["z"]), free(nv_io["z"]))


def test_nested_easydict_kwargs_are_read_as_plain_dicts(snapshot, nv_reference):
    # training runs pickle nested kwargs as dnnlib.EasyDict, which arrives as a record
    def as_easydict(kwargs: dict) -> None:
        record = PickledRecord("dnnlib.util", "EasyDict")
        record.dict_items.update(kwargs["synthesis_kwargs"], conv_clamp=256)
        kwargs["synthesis_kwargs"] = record

    gen = load_nvlabs({**snapshot, "G_ema": with_kwargs(snapshot["G_ema"], as_easydict)})
    assert gen.nvlabs_kwargs["synthesis_kwargs"] == {**nv_reference["G_kwargs"]["synthesis_kwargs"], "conv_clamp": 256}
    assert gen.config.conv_clamp == 256


def test_torgb_clamp_applies_before_the_skip_is_added():
    torch.manual_seed(0)
    layer = ToRGB(8, 16, upsample=True, clamp=0.01)
    x, w, skip = torch.randn(2, 8, 8, 8), torch.randn(2, 16), torch.full((2, 3, 4, 4), 5.0)
    alone = layer(x, w)
    assert alone.abs().max() <= 0.01 and alone.abs().max() > 0.005
    # a constant image upsamples to itself away from the border; the clamped part rides on top
    torch.testing.assert_close(layer(x, w, skip)[..., 2:-2, 2:-2], alone[..., 2:-2, 2:-2] + 5.0)


# ---- full-size layouts (meta device: shapes only, no memory) ----------------------------------

@pytest.mark.parametrize("name,size", [("sg2_rosinality_256_cm2", 256), ("sg2_rosinality_1024_cm2", 1024)])
def test_rosinality_full_size_keys_and_shapes(full_keys, name, size):
    with torch.device("meta"):
        gen = StyleGAN2Generator(StyleGAN2Config(size, 512, 8, rosinality_channels(size, 2)))
        disc = StyleGAN2Discriminator(size, rosinality_channels(size, 2))
    expected = full_keys[name]
    assert shapes(gen.state_dict()) == expected["g_ema"]
    assert shapes(disc.state_dict()) == expected["d"]
    # the published counts include the noise and filter buffers
    assert sum(v.numel() for v in gen.state_dict().values()) == expected["n_params_g"]
    assert sum(v.numel() for v in disc.state_dict().values()) == expected["n_params_d"]


def test_nvlabs_ffhq_config_f_keys_shapes_and_order(full_keys):
    with torch.device("meta"):
        gen = StyleGAN2Generator(StyleGAN2Config(1024, 512, 8, nvlabs_channels(1024)))
        disc = StyleGAN2Discriminator(1024, nvlabs_channels(1024))
    expected = full_keys["sg2ada_ffhq1024_configf"]
    g_state = rosinality_to_nvlabs_generator(gen.state_dict(), gen.w_avg)
    d_state = rosinality_to_nvlabs_discriminator(disc.state_dict())
    assert list(g_state) == list(expected["G_ema"]) and shapes(g_state) == expected["G_ema"]
    assert list(d_state) == list(expected["D"]) and shapes(d_state) == expected["D"]
    assert sum(v.numel() for v in g_state.values()) == expected["n_params_G"]


def test_width_tables_agree_for_config_f():
    assert rosinality_channels(1024, 2) == nvlabs_channels(1024, 32768, 512)


# ---- noise, truncation, mixing, batching ------------------------------------------------------

@torch.no_grad()
def test_noise_modes_random_varies_none_differs_const_repeats(nv_gen, nv_io):
    z = nv_io["z"]
    torch.testing.assert_close(nv_gen(z, noise_mode="const"), nv_gen(z, noise_mode="const"), rtol=0, atol=0)
    assert not torch.allclose(nv_gen(z, noise_mode="random"), nv_gen(z, noise_mode="random"))
    assert not torch.allclose(nv_gen(z, noise_mode="none"), nv_gen(z, noise_mode="const"))
    with pytest.raises(ValueError, match="noise_mode"):
        nv_gen(z, noise_mode="fixed")


@torch.no_grad()
def test_explicit_noise_overrides_the_mode_per_layer(ros_ema, ros_io):
    zeros = [torch.zeros_like(n) for n in ros_io["noise"]]
    torch.testing.assert_close(ros_ema(ros_io["z"], noise=zeros), ros_ema(ros_io["z"], noise_mode="none"))
    partial = [ros_io["noise"][0]] + [None] * 6
    mixed = ros_ema(ros_io["z"], noise=partial, noise_mode="none")
    assert not torch.allclose(mixed, ros_ema(ros_io["z"], noise_mode="none"))


@torch.no_grad()
def test_psi_one_is_identity_and_psi_zero_gives_w_avg_below_cutoff(ros_ema, ros_io):
    z = ros_io["z"]
    plain = ros_ema.mapping(z, psi=1)
    torch.testing.assert_close(ros_ema.mapping(z, psi=1, truncation_cutoff=2), plain, rtol=0, atol=0)
    torch.testing.assert_close(ros_ema(z, psi=1), ros_ema(z), rtol=0, atol=0)
    cut = ros_ema.mapping(z, psi=0, truncation_cutoff=4)
    torch.testing.assert_close(cut[:, :4], ros_ema.w_avg.expand(3, 4, -1), rtol=0, atol=0)
    torch.testing.assert_close(cut[:, 4:], plain[:, 4:], rtol=0, atol=0)


@torch.no_grad()
def test_mixing_at_the_ends_equals_one_source(ros_ema, ros_io):
    z, z2 = ros_io["z"], ros_io["z2"]
    torch.testing.assert_close(ros_ema(z, mix_z=z2, inject_index=ros_ema.num_ws), ros_ema(z))
    torch.testing.assert_close(ros_ema(z, mix_z=z2, inject_index=0), ros_ema(z2))


@torch.no_grad()
def test_image_n_depends_on_seed_and_index_not_batch(ros_ema):
    whole = ros_ema.sample_latents(5, seed=3)
    tail = ros_ema.sample_latents(3, seed=3, start=2)
    torch.testing.assert_close(tail, whole[2:], rtol=0, atol=0)
    torch.testing.assert_close(ros_ema(tail), ros_ema(whole)[2:], rtol=0, atol=TOLERANCE)


def test_describe_reports_shapes_and_truncation_source(nv_gen):
    facts = nv_gen.describe()
    assert facts["format"] == "nvlabs" and facts["resolution"] == 32 and facts["num_ws"] == 8
    assert facts["channels"] == [32, 32, 16, 8] and facts["has_discriminator"]
    json.dumps(facts)


@torch.no_grad()
@pytest.mark.parametrize("path,io_key,ref_key", [
    (ROS / "sg2_rosinality_tiny32.pt", "ros", "img_ema_const_noise_buffers"),
    (NV / "sg2ada_tiny32_nosrc.pkl", "nv", "img_const_noise")])
def test_load_generator_detects_and_reads_both_formats(path, io_key, ref_key, ros_io, nv_io):
    from patchscope.generators.io.formats import load_generator

    io = {"ros": ros_io, "nv": nv_io}[io_key]
    gen = load_generator(path)
    assert isinstance(gen, StyleGAN2Generator) and gen.discriminator is not None
    assert_matches(gen(io["z"]), io[ref_key])


# ---- errors: one line naming the file ---------------------------------------------------------

def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_converter_layout_without_g_refuses_use_ema_false():
    ckpt = load_torch(ROS / "sg2_rosinality_tiny32_converted_style.pt")
    with pytest.raises(CheckpointError) as err:
        load_rosinality(ckpt, use_ema=False, source="conv.pt")
    assert one_line(err).startswith("conv.pt:") and "'g'" in str(err.value)


def test_generator_state_with_a_missing_key_is_named(ros_train):
    broken = {**ros_train, "g_ema": {k: v for k, v in ros_train["g_ema"].items() if k != "convs.3.noise.weight"}}
    with pytest.raises(CheckpointError) as err:
        load_rosinality(broken, source="broken.pt")
    assert "broken.pt" in one_line(err) and "convs.3.noise.weight" in str(err.value)


def test_non_stylegan2_dict_is_refused(ros_train):
    with pytest.raises(CheckpointError, match="bad.pt: expected a rosinality"):
        load_rosinality({"netG": {}}, source="bad.pt")
    swagan = {**ros_train, "args": copy.copy(ros_train["args"])}
    swagan["args"].arch = "swagan"
    with pytest.raises(CheckpointError, match="swagan"):
        load_rosinality(swagan, source="sw.pt")


def test_conditional_nvlabs_generator_is_refused(snapshot):
    conditional = {**snapshot, "G_ema": with_kwargs(snapshot["G_ema"], lambda kw: kw.update(c_dim=10))}
    with pytest.raises(CheckpointError) as err:
        load_nvlabs(conditional, source="cond.pkl")
    assert one_line(err).startswith("cond.pkl:") and "c_dim=10" in str(err.value)


def test_nvlabs_file_loader_names_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pkl"):
        load_nvlabs_file(tmp_path / "nothing.pkl")
    assert load_nvlabs_file(NV / "sg2ada_tiny32_nosrc.pkl").format == "nvlabs"
