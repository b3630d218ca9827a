"""Progressive GAN as the official TensorFlow code builds it (`G_paper` / `D_paper`, the
networks the paper sampled), rebuilt in PyTorch from the numpy variables of its pickle.

Used by `generators.io.formats` (format `pgan_tf`); no TensorFlow is needed.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchscope.common.atomic import replace_atomically
from patchscope.common.errors import CheckpointError
from patchscope.generators.base import Generator
from patchscope.generators.io.bounds import check_copies, check_resolution
from patchscope.generators.io.safe_pickle import PickledRecord, variable_arrays
from patchscope.generators.pgan.zoo import pixel_norm, upscale_nearest

SQRT2 = math.sqrt(2.0)


class TFLayer(nn.Module):
    """A TF conv or dense layer with equalized learning rate: the weight (not the bias) is
    scaled by gain / sqrt(fan_in) at run time.

    `kind` is `dense`, `dense_4x4` (G's first layer: reshaped to 4x4 maps, then a
    per-channel bias), `conv`, `conv_up` (upscale2d_conv2d: a stride-2 transposed conv
    with the 3x3 kernel summed over 2x2 shifts) or `conv_down` (conv2d_downscale2d).
    Weights are stored in PyTorch layout.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, kind: str, gain: float = SQRT2,
                 use_wscale: bool = True, scope: str = "") -> None:
        super().__init__()
        self.scope = scope  # the TF variable scope, e.g. "8x8/Conv0": how the layer is written back
        weight_t = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        if kind in ("dense", "dense_4x4"):  # TF [in, out] -> [out, in]
            fan_in = weight.shape[0]
            weight_t = weight_t.t()
        elif kind == "conv_up":  # TF [kh, kw, out, in] -> conv_transpose [in, out, kh, kw]
            fan_in = weight.shape[0] * weight.shape[1] * weight.shape[3]
            weight_t = weight_t.permute(3, 2, 0, 1)
        else:  # TF [kh, kw, in, out] -> [out, in, kh, kw]
            fan_in = weight.shape[0] * weight.shape[1] * weight.shape[2]
            weight_t = weight_t.permute(3, 2, 0, 1)
        self.kind = kind
        self.scale = gain / math.sqrt(fan_in) if use_wscale else 1.0
        self.weight = nn.Parameter(weight_t.contiguous())
        self.bias = nn.Parameter(torch.from_numpy(np.asarray(bias, dtype=np.float32)).clone())

    def tf_weight(self) -> np.ndarray:
        """The weight in TF layout again: dense [in, out], conv [kh, kw, in, out], conv_up [kh, kw, out, in]."""
        weight = self.weight.detach().float().cpu()
        weight = weight.t() if self.kind in ("dense", "dense_4x4") else weight.permute(2, 3, 1, 0)
        return weight.contiguous().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        if self.kind == "dense":
            return F.linear(x.flatten(1), w, self.bias)
        if self.kind == "dense_4x4":
            x = F.linear(x.flatten(1), w).reshape(x.shape[0], -1, 4, 4)
            return x + self.bias.reshape(1, -1, 1, 1)
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, padding=w.shape[-1] // 2)
        w = F.pad(w, (1, 1, 1, 1))
        w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]
        if self.kind == "conv_up":
            return F.conv_transpose2d(x, w, self.bias, stride=2, padding=1)
        return F.conv2d(x, w * 0.25, self.bias, stride=2, padding=1)


def tf_minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """TF PGAN's minibatch-stddev channel: biased variance over groups of min(group_size, N),
    sample i in group i mod (N / group size)."""
    n, c, h, w = x.shape
    size = min(group_size, n)
    if n % size:  # TF's reshape to [size, -1, ...] fails the same way
        raise ValueError(f"minibatch stddev needs a batch divisible by {size}, got {n}")
    y = x.reshape(size, -1, c, h, w)
    y = (y - y.mean(dim=0, keepdim=True)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=(1, 2, 3), keepdim=True)
    return torch.cat([x, y.repeat(size, 1, h, w)], dim=1)


def _lerp_clip(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * min(max(t, 0.0), 1.0)


class _Variables:
    """The variables of a TF network, looked up by name: from a pickled record's `[(name, ndarray)]`
    list, or (`from_arrays`) from the name -> array mapping patchscope writes."""

    def __init__(self, record: PickledRecord | None, role: str) -> None:
        self.role = role
        self.arrays: dict[str, np.ndarray] = {}
        self.kwargs: dict[str, Any] = {}
        if record is None:
            return
        try:
            self.arrays = {str(k): np.asarray(v) for k, v in record.attr("variables", [])}
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"network {role} has unreadable variables ({error})") from error
        self.kwargs = dict(record.attr("static_kwargs", {}) or {})

    @classmethod
    def from_arrays(cls, arrays: Any, kwargs: Any, role: str) -> _Variables:
        if not isinstance(arrays, Mapping) or not isinstance(kwargs, Mapping):
            raise CheckpointError(f"network {role}: expected a mapping of variables and one of static_kwargs")
        variables = cls(None, role)
        variables.arrays = variable_arrays(dict(arrays), role)
        variables.kwargs = dict(kwargs)
        return variables

    def layer(self, scope: str, kind: str, gain: float = SQRT2) -> TFLayer:
        try:
            weight, bias = self.arrays[f"{scope}/weight"], self.arrays[f"{scope}/bias"]
        except KeyError as error:
            raise CheckpointError(f"network {self.role} lacks TF PGAN variable {error}") from error
        return TFLayer(weight, bias, kind, gain, bool(self.kwargs.get("use_wscale", True)), scope)

    def lod(self) -> float:
        return float(self.arrays.get("lod", 0.0))


def _resolution_log2(variables: _Variables) -> int:
    resolution = variables.kwargs.get("resolution", 0)
    return int(math.log2(check_resolution(resolution, f"network {variables.role}")))


class PGANTFGenerator(Generator):
    """`G_paper` (linear structure; same outputs as the recursive one TF evaluates).

    `alpha` is TF's `lod_in`: 0 the full resolution, t in (0, 1) blends the last scale with
    the upsampled previous one, larger values show lower scales upsampled.
    """

    format = "pgan_tf"

    def __init__(self, variables: _Variables) -> None:
        super().__init__()
        kwargs = variables.kwargs
        if int(kwargs.get("label_size", 0)):
            raise CheckpointError("conditional TF PGAN networks (label_size > 0) are not supported")
        self.static_kwargs, self.lod = dict(kwargs), variables.lod()  # written back by save_pgan_tf
        self.resolution_log2 = _resolution_log2(variables)
        self.resolution = 2 ** self.resolution_log2
        # The variable names tell fused from separate up-scaling, whatever static_kwargs say.
        self.fused_scale = "8x8/Conv0_up/weight" in variables.arrays
        self.normalize_latents = bool(kwargs.get("normalize_latents", True))
        self.use_pixelnorm = bool(kwargs.get("use_pixelnorm", True))
        self.epsilon = float(kwargs.get("pixelnorm_epsilon", 1e-8))
        self.leaky = 0.2 if bool(kwargs.get("use_leakyrelu", True)) else 0.0
        self.alpha = variables.lod()
        # gain sqrt(2)/4 is TF PGAN's override to match its original Theano code
        self.dense = variables.layer("4x4/Dense", "dense_4x4", gain=SQRT2 / 4)
        self.latent_dim = int(self.dense.weight.shape[1])
        self.conv4 = variables.layer("4x4/Conv", "conv")
        self.blocks = nn.ModuleList()
        for res in range(3, self.resolution_log2 + 1):
            scope = f"{2 ** res}x{2 ** res}"
            first = variables.layer(f"{scope}/Conv0_up", "conv_up") if self.fused_scale \
                else variables.layer(f"{scope}/Conv0", "conv")
            self.blocks.append(nn.ModuleList([first, variables.layer(f"{scope}/Conv1", "conv")]))
        self.to_rgb = nn.ModuleList(variables.layer(f"ToRGB_lod{self.resolution_log2 - res}", "conv", gain=1.0)
                                    for res in range(2, self.resolution_log2 + 1))

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leaky)
        return pixel_norm(x, self.epsilon) if self.use_pixelnorm else x

    def forward(self, z: torch.Tensor, alpha: float | None = None, **opts: Any) -> torch.Tensor:
        lod_in = self.alpha if alpha is None else float(alpha)
        x = pixel_norm(z, self.epsilon) if self.normalize_latents else z
        x = self._activate(self.dense(x))
        x = self._activate(self.conv4(x))
        images = self.to_rgb[0](x)
        for index, (first, second) in enumerate(self.blocks):
            lod = self.resolution_log2 - (index + 3)
            if not self.fused_scale:
                x = upscale_nearest(x)
            x = self._activate(second(self._activate(first(x))))
            images = _lerp_clip(self.to_rgb[index + 1](x), upscale_nearest(images), lod_in - lod)
        return images


class PGANTFDiscriminator(nn.Module):
    """`D_paper` (linear structure); `alpha` is TF's `lod_in` as for the generator."""

    def __init__(self, variables: _Variables) -> None:
        super().__init__()
        kwargs = variables.kwargs
        self.static_kwargs, self.lod = dict(kwargs), variables.lod()  # written back by save_pgan_tf
        self.resolution_log2 = _resolution_log2(variables)
        self.resolution = 2 ** self.resolution_log2
        self.fused_scale = f"{self.resolution}x{self.resolution}/Conv1_down/weight" in variables.arrays
        self.group_size = int(kwargs.get("mbstd_group_size", 4))
        self.alpha = variables.lod()
        self.from_rgb = nn.ModuleList(variables.layer(f"FromRGB_lod{self.resolution_log2 - res}", "conv")
                                      for res in range(2, self.resolution_log2 + 1))
        self.blocks = nn.ModuleList()
        for res in range(self.resolution_log2, 2, -1):
            scope = f"{2 ** res}x{2 ** res}"
            second = variables.layer(f"{scope}/Conv1_down", "conv_down") if self.fused_scale \
                else variables.layer(f"{scope}/Conv1", "conv")
            self.blocks.append(nn.ModuleList([variables.layer(f"{scope}/Conv0", "conv"), second]))
        self.conv4 = variables.layer("4x4/Conv", "conv")
        self.dense0 = variables.layer("4x4/Dense0", "dense")
        self.dense1 = variables.layer("4x4/Dense1", "dense", gain=1.0)

    def forward(self, images: torch.Tensor, alpha: float | None = None,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores [N, 1] (and the Dense0 activations when `return_features`)."""
        lod_in = self.alpha if alpha is None else float(alpha)
        act = functools.partial(F.leaky_relu, negative_slope=0.2)
        x = act(self.from_rgb[-1](images))
        for index, (first, second) in enumerate(self.blocks):
            res = self.resolution_log2 - index
            x = act(second(act(first(x))))
            if not self.fused_scale:
                x = F.avg_pool2d(x, 2)
            images = F.avg_pool2d(images, 2)
            lower = act(self.from_rgb[res - 3](images))
            x = _lerp_clip(x, lower, lod_in - index)
        if self.group_size > 1:
            x = tf_minibatch_stddev(x, self.group_size)
        x = act(self.conv4(x))
        features = act(self.dense0(x))
        scores = self.dense1(features)[:, :1]
        return (scores, features) if return_features else scores


def _network_records(pickled: Any) -> tuple[PickledRecord, PickledRecord, PickledRecord]:
    if not (isinstance(pickled, tuple) and len(pickled) == 3
            and all(isinstance(n, PickledRecord) for n in pickled)):
        raise CheckpointError("a TF PGAN pickle holds the tuple (G, D, Gs) of networks")
    for network, expected in zip(pickled, ("G_paper", "D_paper", "G_paper")):
        if network.attr("build_func_name") != expected:
            raise CheckpointError(f"expected a {expected} network, found {network.attr('build_func_name')!r}")
    return pickled


def _assemble(g_variables: _Variables, d_variables: _Variables, alpha: float | None) -> PGANTFGenerator:
    # each layer copies its variables to float32: shared buffers would multiply
    check_copies([*g_variables.arrays.values(), *d_variables.arrays.values()], "TF PGAN variables")
    try:
        generator = PGANTFGenerator(g_variables)
        generator.discriminator = PGANTFDiscriminator(d_variables)
    except (TypeError, ValueError, IndexError, AttributeError) as error:  # arrays of the wrong kind or rank
        raise CheckpointError(f"TF PGAN variables have unexpected types or shapes ({error})") from error
    if alpha is not None:
        generator.alpha = generator.discriminator.alpha = float(alpha)
    generator.eval()
    return generator


def load_pgan_tf(pickled: Any, use_avg: bool = True, alpha: float | None = None,
                 **opts: Any) -> PGANTFGenerator:
    """Rebuild Gs (`use_avg`, what the paper sampled) or G from the `(G, D, Gs)` pickle, with
    D attached as `.discriminator`."""
    if opts:
        raise ValueError(f"option(s) {sorted(opts)} do not apply to TF PGAN pickles")
    g_record, d_record, gs_record = _network_records(pickled)
    chosen = gs_record if use_avg else g_record
    return _assemble(_Variables(chosen, chosen.attr("name", "Gs" if use_avg else "G")),
                     _Variables(d_record, d_record.attr("name", "D")), alpha)


# patchscope's file for a TF PGAN it has trained further (finetuning): the networks' TF variables, in TF
# layout and under TF names, with their static_kwargs — the pickle's content without its code or TF objects.
TF_TORCH_FORMAT = "patchscope_pgan_tf"
TF_NETWORKS = ("G", "D", "Gs")


def tf_variables(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every TF variable of a rebuilt G_paper or D_paper (an attached discriminator left out)."""
    variables = {"lod": torch.tensor(float(network.lod))}
    for name, layer in network.named_modules():
        if isinstance(layer, TFLayer) and not name.startswith("discriminator."):
            variables[f"{layer.scope}/weight"] = torch.from_numpy(layer.tf_weight())
            variables[f"{layer.scope}/bias"] = layer.bias.detach().float().cpu().clone()
    return variables


def save_pgan_tf(average: PGANTFGenerator, path: str | os.PathLike, *, net_generator: PGANTFGenerator,
                 discriminator: PGANTFDiscriminator) -> Path:
    """Write `average` as Gs, `net_generator` as G and `discriminator` as D (a torch file of tensors,
    read back by `load_generator` like the pickle they came from); atomically."""
    state = {"format": TF_TORCH_FORMAT, "version": 1}
    for role, network in zip(TF_NETWORKS, (net_generator, discriminator, average)):
        state[role] = {"variables": tf_variables(network), "static_kwargs": dict(network.static_kwargs)}
    path = Path(path)
    replace_atomically(path, lambda file: torch.save(state, file))
    return path


def load_pgan_tf_torch(state: Mapping[str, Any], use_avg: bool = True, alpha: float | None = None,
                       **opts: Any) -> PGANTFGenerator:
    """`load_pgan_tf` for the file `save_pgan_tf` writes."""
    if opts:
        raise ValueError(f"option(s) {sorted(opts)} do not apply to TF PGAN networks")
    missing = [role for role in TF_NETWORKS if not isinstance(state.get(role), Mapping)]
    if missing:
        raise CheckpointError(f"a {TF_TORCH_FORMAT} file lacks the network(s) {', '.join(missing)}")
    role = "Gs" if use_avg else "G"
    networks = {r: _Variables.from_arrays(state[r].get("variables"), state[r].get("static_kwargs"), r)
                for r in (role, "D")}
    return _assemble(networks[role], networks["D"], alpha)
