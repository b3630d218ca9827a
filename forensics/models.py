"""Patch classifiers: a backbone truncated after an early block plus a 1x1 conv head.

Every output cell of the `N x 2 x H' x W'` logit map judges one receptive-field
patch (channel 1 = fake, channel 0 = real: common.labels). `build_model(name)` is
the entry point used by training, scoring, the attacks and the analysis.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from patchscope.common.labels import NUM_CLASSES  # logits: [real, fake]


@dataclass(frozen=True)
class LayerGeometry:
    """Kernel/stride/padding of one spatial layer on a model's main path."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1


def _geometry(module: nn.Module) -> LayerGeometry:
    pair = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731 - square kernels only
    return LayerGeometry(pair(module.kernel_size), pair(module.stride), pair(module.padding),
                         pair(module.dilation))


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 followed by pointwise 1x1, both without bias (Xception)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, kernel, 1, padding, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))

    def geometry(self) -> list[LayerGeometry]:
        return [_geometry(self.conv1)]


class XceptionBlock(nn.Module):
    """Entry/middle-flow Xception block: `reps` separable convs, optional max-pool, skip."""

    def __init__(self, cin: int, cout: int, reps: int, stride: int, start_with_relu: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        channels = cin
        for _ in range(reps):
            # The first ReLU must not be in place: the block input also feeds the skip.
            layers += [nn.ReLU(inplace=bool(layers)), SeparableConv2d(channels, cout), nn.BatchNorm2d(cout)]
            channels = cout
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)
        if cout != cin or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout)
        else:
            self.skip = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.skipbn(self.skip(x)) if self.skip is not None else x
        return self.rep(x).add_(shortcut)

    def geometry(self) -> list[LayerGeometry]:
        # The main path bounds the receptive field; the 1x1 skip sees a subset of it.
        out: list[LayerGeometry] = []
        for layer in self.rep:
            if isinstance(layer, SeparableConv2d):
                out += layer.geometry()
            elif isinstance(layer, nn.MaxPool2d):
                out.append(_geometry(layer))
        return out


def _resnet_block_geometry(block: nn.Module) -> list[LayerGeometry]:
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    return [_geometry(c) for c in convs]


class PatchClassifier(nn.Sequential):
    """A truncated backbone whose last module is `convout`, the 1x1 two-logit head.

    Children are named as in the public patch-forensics code so that state-dict keys
    (`conv1.weight`, `block1.rep.0.conv1.weight`, `layer1.0.conv1.weight`, `convout.weight`)
    carry over.
    """

    def __init__(self, name: str, layers: "OrderedDict[str, nn.Module]"):
        super().__init__(layers)
        self.name = name

    @property
    def feature_channels(self) -> int:
        return self.convout.in_channels

    def geometry(self) -> list[LayerGeometry]:
        """The spatial layers of the main path, input to output, for receptive-field arithmetic."""
        out: list[LayerGeometry] = []
        for module in self.children():
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
                out.append(_geometry(module))
            elif isinstance(module, XceptionBlock):
                out += module.geometry()
            elif isinstance(module, nn.Sequential):  # a ResNet layer of blocks
                for block in module:
                    out += _resnet_block_geometry(block)
        return out

    def output_size(self, input_size: int) -> int:
        """Side of the logit map for a square input of `input_size` pixels."""
        size = input_size
        for g in self.geometry():
            size = (size + 2 * g.padding - g.dilation * (g.kernel - 1) - 1) // g.stride + 1
        return size


XCEPTION_BLOCKS = {  # name: (cin, cout, reps, stride, start_with_relu)
    "block1": (64, 128, 2, 2, False),
    "block2": (128, 256, 2, 2, True),
    "block3": (256, 728, 2, 2, True),
    "block4": (728, 728, 3, 1, True),
    "block5": (728, 728, 3, 1, True),
}


def make_xception(last_block: str) -> PatchClassifier:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(3, 32, 3, 2, 0, bias=False), bn1=nn.BatchNorm2d(32), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(32, 64, 3, bias=False), bn2=nn.BatchNorm2d(64), relu2=nn.ReLU(inplace=True),
    )
    for block, (cin, cout, reps, stride, first_relu) in XCEPTION_BLOCKS.items():
        layers[block] = XceptionBlock(cin, cout, reps, stride, first_relu)
        if block == last_block:
            layers["convout"] = nn.Conv2d(cout, NUM_CLASSES, 1)
            return PatchClassifier(f"xception_{last_block}", layers)
    raise ValueError(f"unknown Xception block {last_block!r}")


RESNET_DEPTHS = {18: (tv_resnet.BasicBlock, [2, 2, 2, 2]), 34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
                 50: (tv_resnet.Bottleneck, [3, 4, 6, 3])}


def make_resnet(depth: int, last_layer: str) -> PatchClassifier:
    block, counts = RESNET_DEPTHS[depth]
    full = tv_resnet.ResNet(block, counts, num_classes=NUM_CLASSES)  # random init; re-initialised below
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=full.conv1, bn1=full.bn1, relu=full.relu, maxpool=full.maxpool)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layers[name] = getattr(full, name)
        if name == last_layer:
            channels = layers[name][-1].bn3.num_features if depth >= 50 else layers[name][-1].bn2.num_features
            layers["convout"] = nn.Conv2d(channels, NUM_CLASSES, 1)
            return PatchClassifier(f"resnet{depth}_{last_layer}", layers)
    raise ValueError(f"unknown ResNet layer {last_layer!r}")


INITS = ("xavier", "kaiming")


def init_weights(model: nn.Module, init: str = "xavier", gain: float = 0.02) -> None:
    """`xavier`: the public code's init — xavier-normal (gain 0.02) convs, BN weight ~ N(1, 0.02).

    `kaiming`: PyTorch's default layer init. With Adam the paper's tiny weights move by a
    large fraction per step, which makes short runs on small data slow to converge.
    """
    if init == "kaiming":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()
        return
    if init != "xavier":
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


MODELS: dict[str, Callable[[], PatchClassifier]] = {
    **{f"xception_{b}": (lambda b=b: make_xception(b)) for b in XCEPTION_BLOCKS},
    **{f"resnet{d}_{layer}": (lambda d=d, layer=layer: make_resnet(d, layer))
       for d in (18, 34, 50) for layer in ("layer1", "layer2")},
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, seed: int | None = None, init: str = "xavier") -> PatchClassifier:
    """A freshly initialised patch classifier; `seed` makes the initial weights reproducible."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        model = MODELS[name]()
        init_weights(model, init)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
