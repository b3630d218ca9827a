"""Building blocks of the classifiers: layer geometry, Xception's separable blocks, the classifier base class.

Used by `forensics.models` (the truncated patch classifiers) and `forensics.baselines` / `forensics.meso`
(the full-image baselines); `forensics.receptive` reads the geometry every classifier reports.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

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


# Global pooling (or a flatten into dense layers) as one spatial layer: a window and a stride wider than any
# image, centred by its padding, so every input side gives exactly one output cell that sees the whole image
# (the receptive-field arithmetic then clips its box to the image, and a heatmap is one uniform value).
_WHOLE = 1 << 24
WHOLE_IMAGE = LayerGeometry(kernel=2 * _WHOLE + 1, stride=_WHOLE, padding=_WHOLE)


def layer_geometry(module: nn.Module) -> LayerGeometry:
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
        return [layer_geometry(self.conv1)]


class XceptionBlock(nn.Module):
    """Xception block: `reps` separable convs, optional max-pool, skip.

    `grow_first`: the first separable conv widens to `cout` (entry and middle flow); otherwise the last one
    does (the exit flow's 728 -> 1024 block).
    """

    def __init__(self, cin: int, cout: int, reps: int, stride: int, start_with_relu: bool = True,
                 grow_first: bool = True):
        super().__init__()
        widths = [cin] + ([cout] * reps if grow_first else [cin] * (reps - 1) + [cout])
        layers: list[nn.Module] = []
        for channels_in, channels_out in zip(widths, widths[1:]):
            # The first ReLU must not be in place: the block input also feeds the skip.
            layers += [nn.ReLU(inplace=bool(layers)), SeparableConv2d(channels_in, channels_out),
                       nn.BatchNorm2d(channels_out)]
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
                out.append(layer_geometry(layer))
        return out


def xception_stem() -> "OrderedDict[str, nn.Module]":
    """Xception's first two convolutions (32 and 64 channels), as the public code names them."""
    return OrderedDict(
        conv1=nn.Conv2d(3, 32, 3, 2, 0, bias=False), bn1=nn.BatchNorm2d(32), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(32, 64, 3, bias=False), bn2=nn.BatchNorm2d(64), relu2=nn.ReLU(inplace=True),
    )


def _resnet_block_geometry(block: nn.Module) -> list[LayerGeometry]:
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    return [layer_geometry(c) for c in convs]


class PatchClassifier(nn.Sequential):
    """A backbone whose last module is `convout`, the head: an `N x 2 x H' x W'` logit map.

    Children are named as in the public patch-forensics code so that state-dict keys
    (`conv1.weight`, `block1.rep.0.conv1.weight`, `layer1.0.conv1.weight`, `convout.weight`)
    carry over. `loss` names the training loss (`forensics.losses`); `whole_image` is true for a
    full-image classifier, whose single output cell sees the whole input.
    """

    loss = "ce"
    whole_image = False

    def __init__(self, name: str, layers: "OrderedDict[str, nn.Module]"):
        super().__init__(layers)
        self.name = name

    @property
    def feature_channels(self) -> int:
        """Width of the features the head reads."""
        head = self.convout
        return head.in_channels if isinstance(head, nn.Conv2d) else head.in_features

    def geometry(self) -> list[LayerGeometry]:
        """The spatial layers of the main path, input to output, for receptive-field arithmetic."""
        out: list[LayerGeometry] = []
        for module in self.children():
            if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)):
                return out + [WHOLE_IMAGE]  # nothing after it is spatial
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
                out.append(layer_geometry(module))
            elif hasattr(module, "geometry"):
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


def head(channels: int) -> nn.Conv2d:
    """The two-logit 1x1 head."""
    return nn.Conv2d(channels, NUM_CLASSES, 1)


RESNET_DEPTHS = {18: (tv_resnet.BasicBlock, [2, 2, 2, 2]), 34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
                 50: (tv_resnet.Bottleneck, [3, 4, 6, 3])}
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resnet_trunk(depth: int, last_layer: str = "layer4") -> tuple["OrderedDict[str, nn.Module]", int]:
    """torchvision's ResNet up to `last_layer`, under torchvision's names, and the width it ends with."""
    if last_layer not in RESNET_LAYERS:
        raise ValueError(f"unknown ResNet layer {last_layer!r}")
    block, counts = RESNET_DEPTHS[depth]
    full = tv_resnet.ResNet(block, counts, num_classes=NUM_CLASSES)  # random init; the caller re-initialises
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=full.conv1, bn1=full.bn1, relu=full.relu, maxpool=full.maxpool)
    for name in RESNET_LAYERS[:RESNET_LAYERS.index(last_layer) + 1]:
        layers[name] = getattr(full, name)
    last = layers[last_layer][-1]
    return layers, (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


class ImageClassifier(PatchClassifier):
    """A full-image classifier: its logits are a 1 x 1 patch map, so scoring, evaluation and analysis treat it as
    a patch classifier with one patch.

    The children run in order and end in `convout`. A head with one output is a single logit z, P(fake) =
    sigmoid(z), returned as the logit pair [0, z], whose softmax gives P(fake) = sigmoid(z) again.
    """

    whole_image = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        logits = logits.reshape(logits.shape[0], -1, 1, 1)
        if logits.shape[1] == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        return logits


class InputNorm(nn.Module):
    """Maps patchscope's [-1, 1] inputs to what a network was trained on: (x01 - mean) / std, x01 in [0, 1].

    The constants are not state: a checkpoint or a weight file holds no trace of them.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        # x01 = (x + 1) / 2, so the whole map is x * scale + shift.
        self.register_buffer("scale", 0.5 / std_t, persistent=False)
        self.register_buffer("shift", (0.5 - mean_t) / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
