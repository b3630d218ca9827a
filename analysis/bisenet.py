"""BiSeNet face parser (19 CelebAMask-HQ classes) with the state-dict layout of face-parsing.PyTorch.

Used by `analysis.patches` to give each most-predictive patch a semantic class, as in the paper.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchscope.analysis.segment import Segmenter, check_images
from patchscope.common.errors import InputError

# Label order of CelebAMask-HQ as the public parser was trained (background first).
FACE_PARTS = ["background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
              "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat"]
FACE_GROUPS = ["background", "skin", "brows", "eye", "ear", "nose", "mouth", "neck", "clothes", "hair", "hat"]
# Grouping of the paper's public code (patch-forensics segmenter.py): eyeglasses count as eye,
# earrings as ear, a necklace as neck, and the inner mouth with both lips as mouth.
PART_GROUP = {"background": "background", "skin": "skin", "l_brow": "brows", "r_brow": "brows",
              "l_eye": "eye", "r_eye": "eye", "eye_g": "eye", "l_ear": "ear", "r_ear": "ear", "ear_r": "ear",
              "nose": "nose", "mouth": "mouth", "u_lip": "mouth", "l_lip": "mouth", "neck": "neck",
              "neck_l": "neck", "cloth": "clothes", "hair": "hair", "hat": "hat"}
PART_TO_GROUP = np.array([FACE_GROUPS.index(PART_GROUP[part]) for part in FACE_PARTS], np.int64)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 512  # the parser's training and test resolution
WEIGHTS_NAME = "79999_iter.pth"


class ConvBNReLU(nn.Module):
    """Bias-free conv, batch norm, ReLU: the unit the whole parser is built of (`conv`, `bn` keys)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """ResNet basic block; `downsample.0/1` (1x1 conv + BN) when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18Features(nn.Module):
    """ResNet-18 without its classifier; returns the features at strides 8, 16 and 32."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            self.add_module(f"layer{i}", nn.Sequential(ResidualBlock(cin, cout, stride), ResidualBlock(cout, cout)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """Conv block whose output is reweighted per channel by a gate from its global average."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * gate


class ContextPath(nn.Module):
    """ResNet-18 features refined top-down: global context + stride 32 + stride 16, up to stride 8."""

    def __init__(self):
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # broadcasts like a nearest upsample
        up32 = self.conv_head32(F.interpolate(self.arm32(feat32) + context, feat16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    """Concatenate spatial and context features, then add a channel-attention-weighted copy."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat + feat * gate


class SegmentationHead(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face-parsing BiSeNet; the stride-8 ResNet features stand in for the spatial path, as in the public model.

    `forward` returns the main per-pixel logits (N x classes x H x W); `aux=True` also returns the
    two auxiliary heads (`conv_out16`, `conv_out32`) used only in training.
    """

    def __init__(self, n_classes: int = len(FACE_PARTS)):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, n_classes)
        self.conv_out16 = SegmentationHead(128, 64, n_classes)
        self.conv_out32 = SegmentationHead(128, 64, n_classes)

    def forward(self, x: torch.Tensor, aux: bool = False):
        size = x.shape[2:]
        feat8, up16, up32 = self.cp(x)
        upsample = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=True)  # noqa: E731
        out = upsample(self.conv_out(self.ffm(feat8, up16)))
        if not aux:
            return out
        return out, upsample(self.conv_out16(up16)), upsample(self.conv_out32(up32))


def load_bisenet(weights_path: str | Path, device: str | torch.device = "cpu") -> BiSeNet:
    """BiSeNet with the state dict at `weights_path` (e.g. face-parsing.PyTorch's 79999_iter.pth), in eval mode."""
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: face-parsing weights not found (expected {WEIGHTS_NAME}, the BiSeNet state dict "
                         "published with zllrunning/face-parsing.PyTorch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn file or a pickle with code: name it, never execute it
        raise InputError(f"{path}: not a readable BiSeNet state dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a BiSeNet state dict, got {type(state).__name__}")
    # Checkpoints saved from DataParallel prefix every key with "module."
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = BiSeNet()
    # Checkpoints from before PyTorch 0.4.1 lack BN batch counters; they play no part at inference.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise InputError(f"{path}: not the face-parsing BiSeNet layout ({detail[:200]})") from None
    return model.to(device).eval()


class BiSeNetSegmenter(Segmenter):
    """Face parsing by BiSeNet: images resized to 512 px, ImageNet-normalised, labels resized back.

    With `grouped` (default) the 19 parts are merged into the paper's 11 groups (`FACE_GROUPS`);
    otherwise `classes` are the 19 CelebAMask-HQ parts.
    """

    name = "bisenet"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", grouped: bool = True,
                 input_size: int = INPUT_SIZE, batch_size: int = 8):
        self.device = torch.device(device)
        self.model = load_bisenet(weights_path, self.device)
        self.grouped, self.input_size, self.batch_size = grouped, input_size, batch_size
        self.classes = list(FACE_GROUPS if grouped else FACE_PARTS)

    @torch.no_grad()
    def segment(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        labels = np.zeros(images.shape[:3], np.int64)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            # The public test resizes with PIL bilinear before normalising; antialias matches it when shrinking.
            x = F.interpolate(x, (self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
            parts = self.model((x - mean) / std).argmax(dim=1, keepdim=True).float()
            # Labels at the parser's resolution are mapped back to the image by nearest neighbour, as the paper does.
            parts = F.interpolate(parts, images.shape[1:3], mode="nearest").squeeze(1).long().cpu().numpy()
            labels[start:start + len(parts)] = PART_TO_GROUP[parts] if self.grouped else parts
        return labels
