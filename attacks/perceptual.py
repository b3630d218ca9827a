"""LPIPS perceptual distance built offline: the `lpips` package's bundled linear layers on a
torchvision backbone read from a local file. Used by GAN inversion and the exaggeration shift.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

from patchscope.common.errors import InputError
from patchscope.common.seeding import cpu_seeded
from patchscope.generators.io.allowlist import torch_reason

log = logging.getLogger("patchscope.perceptual")

# LPIPS trunk name -> the torchvision architecture and weights whose `features` it slices.
LPIPS_BACKBONES: dict[str, tuple[str, Any]] = {
    "alex": ("alexnet", tv_models.AlexNet_Weights.IMAGENET1K_V1),
    "vgg": ("vgg16", tv_models.VGG16_Weights.IMAGENET1K_V1),
    "squeeze": ("squeezenet1_1", tv_models.SqueezeNet1_1_Weights.IMAGENET1K_V1),
}
LPIPS_NETS = tuple(LPIPS_BACKBONES)
_PROBE_SIDES = (8, 16, 32, 64, 128)
RANDOM_BACKBONE_SEED = 0


def _check_net(net: str) -> None:
    if net not in LPIPS_BACKBONES:
        raise InputError(f"LPIPS network {net!r}: expected one of {', '.join(LPIPS_NETS)}")


def backbone_url(net: str) -> str:
    """Where torchvision publishes the ImageNet weights of `net`'s backbone."""
    _check_net(net)
    return LPIPS_BACKBONES[net][1].url


def backbone_file_name(net: str) -> str:
    """torchvision's file name for those weights, as it lies in the torch hub cache."""
    return backbone_url(net).rsplit("/", 1)[-1]


def cached_backbone_path(net: str) -> Path:
    """`$TORCH_HOME/hub/checkpoints/<file>`: where torchvision would have saved a download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / backbone_file_name(net)


def find_backbone_weights(net: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The file to read: `weights` when given (it must exist), else the torch cache copy, else None."""
    _check_net(net)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: LPIPS backbone weights not found (expected the torchvision file "
                             f"{backbone_file_name(net)})")
        return path
    cached = cached_backbone_path(net)
    return cached if cached.is_file() else None


def missing_weights_message(net: str) -> str:
    """Where the backbone file comes from and where it is looked for (the linear layers need nothing)."""
    name = backbone_file_name(net)
    return (f"LPIPS ({net}) needs the torchvision {LPIPS_BACKBONES[net][0]} weights {name}: download "
            f"{backbone_url(net)} and pass --lpips-weights PATH, or put it in {cached_backbone_path(net).parent} "
            f"(LPIPS's own linear layers, v0.1/{net}.pth, come with the lpips package)")


RANDOM_COST = ("--lpips-random (lpips_random: true in a YAML config) runs without it on a random backbone, but its "
               "distances are no longer perceptual: LPIPS values, and the loss terms weighted on them, then only "
               "roughly track how much an image changed, and compare with no other run or the paper")


def read_backbone_state(path: Path, net: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict from `path`, read without unpickling anything but tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only refusals all mean "not a weights file"
        # what torch found, never its advice to load a stranger's file with weights_only=False
        raise InputError(f"{path}: not a torch weights file ({torch_reason(err)})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a torchvision {LPIPS_BACKBONES[net][0]} state dict of tensors")
    return dict(state)


def backbone_key(lpips_key: str) -> str:
    """`slice2.3.weight` -> `features.3.weight`: lpips keeps torchvision's layer index inside each slice."""
    return "features." + lpips_key.split(".", 1)[1]


def load_backbone_state(trunk: nn.Module, state: Mapping[str, torch.Tensor], path: Path, net: str) -> None:
    """Copy torchvision `features.*` tensors into the lpips trunk's `slice*` layers, checking every one."""
    mapped = {}
    for key, current in trunk.state_dict().items():
        source = backbone_key(key)
        if source not in state:
            raise InputError(f"{path}: not a torchvision {LPIPS_BACKBONES[net][0]} state dict "
                             f"(missing {source}; expected {backbone_file_name(net)})")
        if state[source].shape != current.shape:
            raise InputError(f"{path}: {source} has shape {list(state[source].shape)}, the torchvision "
                             f"{LPIPS_BACKBONES[net][0]} has {list(current.shape)}")
        mapped[key] = state[source]
    trunk.load_state_dict(mapped, strict=True)


class PerceptualDistance(nn.Module):
    """Frozen LPIPS: `distance(x, y)` -> [N] for images in [-1, 1].

    Inputs smaller than the trunk can take (alexnet collapses below 32 px) are upsampled
    bilinearly to the smallest side it accepts, measured once at construction.
    """

    def __init__(self, model: lpips.LPIPS, net: str, source: str) -> None:
        super().__init__()
        self.model = model
        self.net = net
        self.source = source  # the weights file, or "random"
        self.requires_grad_(False)
        self.eval()
        self.min_side = self._smallest_side()

    def train(self, mode: bool = True) -> PerceptualDistance:
        # Always eval: the bundled linear layers carry dropout, which would make the distance random.
        return super().train(False)

    @torch.no_grad()
    def _smallest_side(self) -> int:
        probe_param = next(self.model.net.parameters())
        for side in _PROBE_SIDES:
            try:
                self.model.net(probe_param.new_zeros(1, 3, side, side))
                return side
            except RuntimeError:
                continue
        return _PROBE_SIDES[-1]

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) >= self.min_side:
            return x
        scale = self.min_side / min(x.shape[-2:])
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {list(x.shape)} and {list(y.shape)}")
        return self.model(self._fit(x), self._fit(y)).flatten()


def load_lpips(net: str = "alex", weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               allow_random: bool = False) -> PerceptualDistance:
    """LPIPS v0.1 with the package's linear layers and the backbone from `weights` or the torch cache.

    Nothing is downloaded. Without a weights file: an InputError naming the file and where it is
    published, or with `allow_random` a random backbone (tests and smoke runs; the same in every
    run) and a warning.
    """
    path = find_backbone_weights(net, weights)
    if path is None and not allow_random:
        raise InputError(f"{missing_weights_message(net)}; or {RANDOM_COST}")
    # A fixed seed makes the random backbone the same in every run (so resumed runs agree),
    # without touching the caller's random stream.
    with warnings.catch_warnings(), cpu_seeded(RANDOM_BACKBONE_SEED):
        # lpips builds torchvision models with the deprecated `pretrained=False`; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
    if path is None:
        log.warning("LPIPS (%s) uses a RANDOM backbone: distances are not perceptual (%s)", net,
                    missing_weights_message(net))
        source = "random"
    else:
        load_backbone_state(model.net, read_backbone_state(path, net), path, net)
        source = str(path)
    return PerceptualDistance(model, net, source).to(device)
