"""The paper's full-image baselines: ResNet-18, ResNet-50, Xception, MesoInception-4 and Wang et al.'s ResNet-50.

Registered in `forensics.models` beside the patch classifiers. Each gives an `N x 2 x 1 x 1` logit map (one
patch: the whole image), so training, scoring, evaluation and the analysis treat them as patch classifiers.

- `resnet18`, `resnet50`: torchvision's networks under torchvision's names, global average pooling, a 1x1
  conv to 2 logits (the same as an fc layer on the pooled features); inputs as every patchscope model's.
- `xception`: the whole Xception (entry flow, 8 middle-flow blocks, exit flow: the 728 -> 1024 block,
  separable convs to 1536 and 2048), global average pooling, 2 logits; names as the public code's (Cadene's
  pretrainedmodels port, which patch-forensics truncates), so its patch models' keys are a prefix of these.
- `mesoinception4`: see `forensics.meso`; one logit, squared-error loss, as its authors trained it.
- `wang2020_resnet50`: Wang et al.'s CNNDetection detector, a torchvision ResNet-50 whose fc gives one
  logit z (trained there with BCE-with-logits), returned as [0, z]: cross entropy on that pair is exactly
  BCE on z. It normalises inputs with ImageNet's mean and std, as CNNDetection does, and is meant to be
  trained with `--augment blur_jpeg_0.1` or `blur_jpeg_0.5` from ImageNet weights (`--init-weights`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn

from patchscope.forensics.layers import (ImageClassifier, InputNorm, SeparableConv2d, XceptionBlock, head,
                                         resnet_trunk, xception_stem)
from patchscope.forensics.meso import make_mesoinception4

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The whole Xception after its stem: name -> (cin, cout, reps, stride, start_with_relu, grow_first).
XCEPTION_FLOW = {
    "block1": (64, 128, 2, 2, False, True),
    "block2": (128, 256, 2, 2, True, True),
    "block3": (256, 728, 2, 2, True, True),
    **{f"block{i}": (728, 728, 3, 1, True, True) for i in range(4, 12)},
    "block12": (728, 1024, 2, 2, True, False),
}


def make_full_resnet(depth: int, name: str | None = None, logits: int = 2,
                     imagenet_inputs: bool = False) -> ImageClassifier:
    trunk, channels = resnet_trunk(depth)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if imagenet_inputs:
        layers["imagenet_norm"] = InputNorm(IMAGENET_MEAN, IMAGENET_STD)
    layers.update(trunk)
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["convout"] = head(channels) if logits == 2 else nn.Conv2d(channels, logits, 1)
    return ImageClassifier(name or f"resnet{depth}", layers)


def make_full_xception() -> ImageClassifier:
    layers = xception_stem()
    for block, (cin, cout, reps, stride, first_relu, grow_first) in XCEPTION_FLOW.items():
        layers[block] = XceptionBlock(cin, cout, reps, stride, first_relu, grow_first)
    layers.update(
        conv3=SeparableConv2d(1024, 1536), bn3=nn.BatchNorm2d(1536), relu3=nn.ReLU(inplace=True),
        conv4=SeparableConv2d(1536, 2048), bn4=nn.BatchNorm2d(2048), relu4=nn.ReLU(inplace=True),
        avgpool=nn.AdaptiveAvgPool2d(1), convout=head(2048),
    )
    return ImageClassifier("xception", layers)


BASELINES: dict[str, Callable[[], ImageClassifier]] = {
    "resnet18": lambda: make_full_resnet(18),
    "resnet50": lambda: make_full_resnet(50),
    "xception": make_full_xception,
    "mesoinception4": make_mesoinception4,
    "wang2020_resnet50": lambda: make_full_resnet(50, "wang2020_resnet50", logits=1, imagenet_inputs=True),
}
