"""The classifier registry: truncated patch classifiers (a backbone cut after an early block plus a 1x1 conv head)
and the full-image baselines, built by name.

Every output cell of the `N x 2 x H' x W'` logit map judges one receptive-field patch (channel 1 = fake,
channel 0 = real: common.labels); a full-image baseline gives a 1 x 1 map (`forensics.baselines`).
`build_model(name)` is the entry point used by training, scoring, the attacks and the analysis.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from patchscope.common.seeding import cpu_seeded
from patchscope.forensics.baselines import BASELINES
from patchscope.forensics.layers import LayerGeometry, PatchClassifier, XceptionBlock, head, resnet_trunk, xception_stem

__all__ = ["LayerGeometry", "PatchClassifier", "XceptionBlock", "XCEPTION_BLOCKS", "INITS", "MODELS", "make_xception",
           "make_resnet", "init_weights", "model_names", "build_model", "count_parameters"]

XCEPTION_BLOCKS = {  # name: (cin, cout, reps, stride, start_with_relu)
    "block1": (64, 128, 2, 2, False),
    "block2": (128, 256, 2, 2, True),
    "block3": (256, 728, 2, 2, True),
    "block4": (728, 728, 3, 1, True),
    "block5": (728, 728, 3, 1, True),
}


def make_xception(last_block: str) -> PatchClassifier:
    layers = xception_stem()
    for block, (cin, cout, reps, stride, first_relu) in XCEPTION_BLOCKS.items():
        layers[block] = XceptionBlock(cin, cout, reps, stride, first_relu)
        if block == last_block:
            layers["convout"] = head(cout)
            return PatchClassifier(f"xception_{last_block}", layers)
    raise ValueError(f"unknown Xception block {last_block!r}")


def make_resnet(depth: int, last_layer: str) -> PatchClassifier:
    layers, channels = resnet_trunk(depth, last_layer)
    layers["convout"] = head(channels)
    return PatchClassifier(f"resnet{depth}_{last_layer}", layers)


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
    **BASELINES,
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, seed: int | None = None, init: str = "xavier") -> PatchClassifier:
    """A freshly initialised classifier (patch model or baseline); `seed` makes the initial weights reproducible."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    with cpu_seeded(seed) if seed is not None else contextlib.nullcontext():
        model = MODELS[name]()
        init_weights(model, init)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
