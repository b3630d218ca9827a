"""BiSeNet face parser: the public 79999_iter.pth state-dict layout, loading by path, grouped labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from patchscope.analysis.bisenet import FACE_GROUPS, FACE_PARTS, PART_TO_GROUP, BiSeNet, BiSeNetSegmenter, load_bisenet
from patchscope.common.errors import InputError

# Derived by hand from face-parsing.PyTorch (model.py, resnet.py), not from our model:
# ResNet-18 without fc has 11,689,512 - 513,000 = 11,176,512 parameters; on top of it
# arm16 311,808 + arm32 606,720 + conv_head32/16 2 x 147,712 + conv_avg 65,792 + ffm 98,816
# + conv_out 595,200 + conv_out16/32 2 x 75,072 = 2,123,904.
PUBLIC_PARAMETERS = 13_300_416
# 36 bias-free convs (1 key each) + 31 batch norms (weight, bias, running_mean, running_var,
# num_batches_tracked): 36 + 31 * 5.
PUBLIC_KEYS = 191
PUBLIC_SHAPES = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_var": (64,),
    "cp.resnet.layer1.1.conv2.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.conv1.weight": (128, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_mean": (128,),
    "cp.resnet.layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "cp.resnet.layer4.1.bn2.weight": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm16.conv.bn.bias": (128,),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm16.bn_atten.running_var": (128,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_head16.bn.weight": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.convblk.bn.num_batches_tracked": (),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.bn.running_mean": (64,),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


def _public_resnet_keys() -> set[str]:
    """Every key of the public Resnet18: conv1/bn1, layer1..4 of two BasicBlocks, downsample where the shape changes."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"cp.resnet.conv1.weight", *(f"cp.resnet.bn1.{k}" for k in bn)}
    for layer, has_downsample in zip(range(1, 5), (False, True, True, True)):
        for block in (0, 1):
            prefix = f"cp.resnet.layer{layer}.{block}"
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            keys |= {f"{prefix}.bn{i}.{k}" for i in (1, 2) for k in bn}
            if block == 0 and has_downsample:
                keys |= {f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{k}" for k in bn)}
    return keys


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BiSeNet()
    with torch.no_grad():  # non-trivial BN statistics so that loading them is observable
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def test_state_dict_has_the_public_key_layout_and_sizes(state):
    assert len(state) == PUBLIC_KEYS
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked"))) == PUBLIC_PARAMETERS
    for key, shape in PUBLIC_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert {k for k in state if k.startswith("cp.resnet.")} == _public_resnet_keys()
    assert not any(k.startswith(("sp.", "cp.resnet.fc")) for k in state)  # no spatial path, no classifier


def test_parts_and_groups_follow_celebamask_hq():
    assert len(FACE_PARTS) == 19 and FACE_PARTS[0] == "background" and FACE_PARTS[-1] == "hat"
    assert FACE_GROUPS == ["background", "skin", "brows", "eye", "ear", "nose", "mouth", "neck", "clothes",
                           "hair", "hat"]
    group = {part: FACE_GROUPS[PART_TO_GROUP[i]] for i, part in enumerate(FACE_PARTS)}
    assert group["eye_g"] == "eye" and group["ear_r"] == "ear" and group["neck_l"] == "neck"
    assert group["u_lip"] == group["l_lip"] == group["mouth"] == "mouth" and group["cloth"] == "clothes"


def test_missing_weights_name_the_file_and_where_they_are_published(tmp_path):
    with pytest.raises(InputError, match=r"79999_iter.pth: face-parsing weights not found.*face-parsing.PyTorch"):
        BiSeNetSegmenter(tmp_path / "79999_iter.pth")


def test_weights_of_another_layout_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="other.pth: not the face-parsing BiSeNet layout"):
        load_bisenet(tmp_path / "other.pth")


def test_saved_state_dict_loads_and_segments_like_the_model(state, tmp_path):
    # As the 2019 checkpoint may be: DataParallel "module." prefixes, no BN batch counters.
    legacy = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "79999_iter.pth")
    assert BiSeNetSegmenter(tmp_path / "79999_iter.pth").input_size == 512  # the public test resolution
    # 128 px instead of 512 keeps the test fast; the pipeline is the same.
    segmenter = BiSeNetSegmenter(tmp_path / "79999_iter.pth", grouped=False, input_size=128)
    for key, value in state.items():
        assert torch.equal(segmenter.model.state_dict()[key], value), key
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 64, 3), dtype=np.uint8)
    parts = segmenter.segment(image)
    assert parts.shape == (1, 32, 64) and parts.dtype == np.int64 and parts.min() >= 0 and parts.max() < 19

    assert len(np.unique(parts)) > 1  # else the resizing checks below would be vacuous
    # The same labels by hand: resize to 128, ImageNet normalisation, argmax, nearest back to 32 x 64.
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, (128, 128), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = segmenter.model((x - mean) / std).argmax(1)[0].numpy()
    rows, cols = np.arange(32) * 4, np.arange(64) * 2  # nearest: source pixel floor(i * 128 / side)
    np.testing.assert_array_equal(parts[0], expected[rows][:, cols])

    grouped = BiSeNetSegmenter(tmp_path / "79999_iter.pth", input_size=128)
    assert grouped.classes == FACE_GROUPS
    np.testing.assert_array_equal(grouped.segment(image), PART_TO_GROUP[parts])


def test_auxiliary_heads_are_returned_on_request(state):
    model = BiSeNet().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out, out16, out32 = model(torch.zeros(1, 3, 64, 64), aux=True)
    assert out.shape == out16.shape == out32.shape == (1, 19, 64, 64)
