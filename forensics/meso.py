"""MesoInception-4 (Afchar et al., "MesoNet", WIFS 2018), layer for layer as its authors' Keras code builds it.

Registered by `forensics.baselines` as `mesoinception4`, one of the paper's full-image baselines.

The authors' network (DariusAf/MesoNet, classifiers.py), for a 256 x 256 x 3 input:
two inception layers (branches 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 dilation 2 | 1x1 -> 3x3 dilation 3, all with
bias and ReLU, concatenated: 1+4+4+2 = 11 and 2+4+4+2 = 12 channels), each followed by batch norm and a
2x2 max-pool; two 5x5 convolutions of 16 channels (ReLU, batch norm, max-pool 2x2 then 4x4); flatten
(8 x 8 x 16 = 1024), dropout 0.5, dense 16, LeakyReLU 0.1, dropout 0.5, dense 1 with a sigmoid, trained with
squared error. That is 28,615 trainable parameters (Keras counts 28,725 with the 110 batch-norm moving
statistics); the paper's Meso-4 figure, 27,977, follows from the same code the same way.

Here: Keras' "same" padding (symmetric for odd kernels; max-pools padded at the end: `ceil_mode`), Keras'
batch-norm constants (momentum 0.99, i.e. torch momentum 0.01; epsilon 1e-3); inputs in [-1, 1] mapped to
the authors' [0, 1]. The last max-pool is adaptive to an 8 x 8 map: at 256 px it is exactly the 4 x 4 pool,
and other input sizes (the authors' network takes 256 px only) still reach the 1024 features the dense
layer reads. The dense 1 output is the single logit z, so the model returns [0, z] (P(fake) = sigmoid(z),
the authors' output) and trains with the squared error of P(fake) against the label (`loss = "mse"`).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from patchscope.forensics.layers import ImageClassifier, InputNorm, LayerGeometry, layer_geometry

KERAS_BN = dict(eps=1e-3, momentum=0.01)  # Keras BatchNormalization defaults, in torch's terms


class _ConvReLU(nn.Sequential):
    """Conv2d with bias, Keras "same" padding, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation),
            relu=nn.ReLU(inplace=True)))


class InceptionLayer(nn.Module):
    """The authors' InceptionLayer(a, b, c, d): four branches concatenated to a+b+c+d channels."""

    def __init__(self, cin: int, a: int, b: int, c: int, d: int):
        super().__init__()
        self.branch1 = _ConvReLU(cin, a, 1)
        self.branch2 = nn.Sequential(_ConvReLU(cin, b, 1), _ConvReLU(b, b, 3))
        self.branch3 = nn.Sequential(_ConvReLU(cin, c, 1), _ConvReLU(c, c, 3, dilation=2))
        self.branch4 = nn.Sequential(_ConvReLU(cin, d, 1), _ConvReLU(d, d, 3, dilation=3))
        self.out_channels = a + b + c + d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)

    def geometry(self) -> list[LayerGeometry]:
        # The widest branch (1x1, then 3x3 at dilation 3: 7 px) bounds the receptive field.
        return [layer_geometry(self.branch4[0].conv), layer_geometry(self.branch4[1].conv)]


def _pool(size: int) -> nn.MaxPool2d:
    return nn.MaxPool2d(size, size, ceil_mode=True)  # Keras "same": a partial window at the end counts


def make_mesoinception4() -> ImageClassifier:
    layers: OrderedDict[str, nn.Module] = OrderedDict(to_unit=InputNorm((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    inception1, inception2 = InceptionLayer(3, 1, 4, 4, 2), InceptionLayer(11, 2, 4, 4, 2)
    layers.update(
        inception1=inception1, bn1=nn.BatchNorm2d(inception1.out_channels, **KERAS_BN), pool1=_pool(2),
        inception2=inception2, bn2=nn.BatchNorm2d(inception2.out_channels, **KERAS_BN), pool2=_pool(2),
        conv3=nn.Conv2d(inception2.out_channels, 16, 5, padding=2), relu3=nn.ReLU(inplace=True),
        bn3=nn.BatchNorm2d(16, **KERAS_BN), pool3=_pool(2),
        conv4=nn.Conv2d(16, 16, 5, padding=2), relu4=nn.ReLU(inplace=True),
        bn4=nn.BatchNorm2d(16, **KERAS_BN), pool4=nn.AdaptiveMaxPool2d(8),
        flatten=nn.Flatten(), dropout1=nn.Dropout(0.5), dense1=nn.Linear(8 * 8 * 16, 16),
        leaky=nn.LeakyReLU(0.1), dropout2=nn.Dropout(0.5), convout=nn.Linear(16, 1),
    )
    model = ImageClassifier("mesoinception4", layers)
    model.loss = "mse"  # the authors' mean squared error on the sigmoid output
    return model
