"""Patch classifier architectures: the paper's table, output maps, initialisation, registry."""
from __future__ import annotations

import pytest
import torch

from patchscope.forensics.models import build_model, count_parameters, model_names

# REFERENCE.md §1, measured with the public code: channels before the head, parameters (M),
# output map side at 299 px and at 128 px.
PAPER_TABLE = {
    "xception_block1": (128, 0.055, 74, 31),
    "xception_block2": (256, 0.191, 37, 16),
    "xception_block3": (728, 1.108, 19, 8),
    "xception_block4": (728, 2.722, 19, 8),
    "xception_block5": (728, 4.336, 19, 8),
    "resnet18_layer1": (64, 0.158, 75, 32),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_models_match_the_papers_table(name):
    channels, params_m, map299, map128 = PAPER_TABLE[name]
    model = build_model(name)
    assert model.feature_channels == channels
    assert round(count_parameters(model) / 1e6, 3) == params_m
    assert model.output_size(299) == map299 and model.output_size(128) == map128
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 2, map128, map128)


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_gives_a_two_logit_map_of_the_predicted_size(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 67, 67))
    assert out.shape == (2, 2, model.output_size(67), model.output_size(67))
    assert list(model.named_children())[-1][0] == "convout"


def test_initialisation_follows_the_public_code():
    model = build_model("xception_block3", seed=0)
    conv = model.block3.rep[1].pointwise.weight  # 728 x 256 x 1 x 1
    fan_in, fan_out = conv.shape[1], conv.shape[0]
    expected_std = 0.02 * (2.0 / (fan_in + fan_out)) ** 0.5  # xavier-normal, gain 0.02
    assert conv.std().item() == pytest.approx(expected_std, rel=0.05)
    bn = model.block3.rep[2]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(bn.bias) == 0 and torch.count_nonzero(model.convout.bias) == 0


def test_seeded_builds_are_identical_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("xception_block1", seed=7)
    after = torch.rand(1)
    b = build_model("xception_block1", seed=7)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_state_dict_keys_follow_the_public_layout():
    keys = set(build_model("xception_block2").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "block1.rep.0.conv1.weight", "block1.rep.0.pointwise.weight",
            "block1.skip.weight", "block1.skipbn.weight", "block2.rep.1.conv1.weight", "convout.weight",
            "convout.bias"} <= keys
    assert {"layer1.1.conv2.weight", "convout.weight"} <= set(build_model("resnet18_layer1").state_dict())


def test_channels_last_gives_the_same_logits():
    model = build_model("xception_block2", seed=1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="xception_block2"):
        build_model("xception_block9")
