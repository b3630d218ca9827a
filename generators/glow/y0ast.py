"""Reading y0ast Glow-PyTorch state dicts: infer the layout from key names and shapes, check hparams.

Used by format detection and by anyone holding a y0ast `glow_model_*.pth`; returns a `GlowGenerator`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from patchscope.common.errors import CheckpointError
from patchscope.common.userfiles import read_json
from patchscope.generators.glow.model import DEFAULT_TEMPERATURE, Glow, GlowConfig, GlowGenerator
from patchscope.generators.io.bounds import check_copies
from patchscope.generators.io.safe_pickle import load_torch

STEP_KEY = re.compile(r"^flow\.layers\.(\d+)\.actnorm\.bias$")
SPLIT_KEY = re.compile(r"^flow\.layers\.(\d+)\.conv\.logs$")
LOAD_OPTIONS = ("temperature", "n_bits", "source")


def unwrap_state_dict(obj: Any, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The bare state dict: accepts ignite's `{'model': …}` bundle and a DataParallel `module.` prefix."""
    if isinstance(obj, Mapping) and "prior_h" not in obj and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: expected a y0ast Glow state dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def infer_layout(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """Hyper-parameters under y0ast's hparams names, read from key names and shapes.

    `flow_permutation` is None when no 1x1-conv weights exist: "reverse" and "shuffle"
    store nothing, so only hparams can tell them apart.
    """
    if "prior_h" not in state_dict or not any(k.startswith("flow.layers.") for k in state_dict):
        raise CheckpointError(f"{source}: expected a y0ast Glow state dict (keys prior_h and flow.layers.*)")
    if any(k.startswith(("project_ycond.", "project_class.")) for k in state_dict):
        raise CheckpointError(f"{source}: class-conditional Glow (y_condition) is not supported")
    steps = sorted(int(m[1]) for k in state_dict if (m := STEP_KEY.match(k)))
    splits = sorted(int(m[1]) for k in state_dict if (m := SPLIT_KEY.match(k)))
    levels = len(splits) + 1
    if not steps or len(steps) % levels:
        raise CheckpointError(f"{source}: {len(steps)} flow steps cannot fill {levels} levels evenly")
    k = len(steps) // levels
    first = steps[0]
    channels = state_dict[f"flow.layers.{first}.actnorm.bias"].shape[1]
    coupling_out = state_dict[f"flow.layers.{first}.block.4.conv.weight"].shape[0]
    couplings = {channels // 2: "additive", channels: "affine"}
    if coupling_out not in couplings:
        raise CheckpointError(f"{source}: coupling output has {coupling_out} channels; "
                              f"expected {channels // 2} (additive) or {channels} (affine)")
    prior_shape = tuple(state_dict["prior_h"].shape)
    if len(prior_shape) != 4 or prior_shape[2] != prior_shape[3]:
        raise CheckpointError(f"{source}: prior_h has shape {list(prior_shape)}; expected [1, 2C, S, S]")
    if f"flow.layers.{first}.invconv.weight" in state_dict:
        permutation, lu = "invconv", False
    elif f"flow.layers.{first}.invconv.lower" in state_dict:
        permutation, lu = "invconv", True
    else:
        permutation, lu = None, False
    return {
        "image_shape": [prior_shape[2] * 2 ** levels, prior_shape[3] * 2 ** levels, channels // 4],
        "hidden_channels": state_dict[f"flow.layers.{first}.block.0.conv.weight"].shape[0],
        "K": k,
        "L": levels,
        "flow_permutation": permutation,
        "flow_coupling": couplings[coupling_out],
        "LU_decomposed": lu,
        "learn_top": "learn_top_fn.conv.weight" in state_dict,
        "y_condition": False,
    }


def reconcile_hparams(layout: dict[str, Any], hparams: Mapping[str, Any] | None,
                      source: str = "state dict") -> dict[str, Any]:
    """The layout with hparams filling what the weights cannot say; any disagreement is an error."""
    hparams = dict(hparams or {})
    layout = dict(layout)
    if layout["flow_permutation"] is None:
        given = hparams.get("flow_permutation")
        if given == "shuffle":
            raise CheckpointError(f"{source}: flow_permutation 'shuffle' keeps its random order outside the "
                                  "state dict, so these weights cannot be run")
        if given != "reverse":
            raise CheckpointError(f"{source}: no invconv weights; expected hparams with "
                                  "flow_permutation 'reverse'")
        layout["flow_permutation"] = "reverse"
    compared = [k for k in layout if k in hparams]
    if layout["flow_permutation"] != "invconv" and "LU_decomposed" in compared:
        compared.remove("LU_decomposed")  # y0ast keeps the flag even where it has no effect
    differences = [f"{k}: hparams {hparams[k]!r}, weights {layout[k]!r}"
                   for k in compared if _normalise(hparams[k]) != _normalise(layout[k])]
    if differences:
        raise CheckpointError(f"{source}: hparams disagree with the weights ({'; '.join(differences)})")
    return layout


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def config_from_layout(layout: Mapping[str, Any], n_bits: int = 8) -> GlowConfig:
    height, width, in_channels = layout["image_shape"]
    return GlowConfig(resolution=height, hidden_channels=layout["hidden_channels"], steps=layout["K"],
                      levels=layout["L"], coupling=layout["flow_coupling"],
                      permutation=layout["flow_permutation"], lu_decomposed=layout["LU_decomposed"],
                      learn_top=layout["learn_top"], in_channels=in_channels, n_bits=n_bits)


def load_glow_y0ast(state_dict: Mapping[str, Any], hparams: Mapping[str, Any] | None = None,
                    **opts: Any) -> GlowGenerator:
    """A `GlowGenerator` holding these y0ast weights, loaded strictly (tensors adopted, not copied).

    Options: `temperature` (default 0.7), `n_bits` (input quantisation, default hparams'
    `n_bits`/`n_bits_x` or 8), `source` (the file name used in error messages).
    """
    unknown = sorted(set(opts) - set(LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"load_glow_y0ast got unknown options {unknown}; accepted: {list(LOAD_OPTIONS)}")
    source = str(opts.get("source", "state dict"))
    if hparams is not None and not isinstance(hparams, Mapping):
        raise CheckpointError(f"{source}: Glow hparams are a {type(hparams).__name__}; expected a JSON object")
    state_dict = unwrap_state_dict(state_dict, source)
    check_copies(state_dict.values(), source)  # each tensor is converted to float32 on its own
    layout = reconcile_hparams(infer_layout(state_dict, source), hparams, source)
    n_bits = opts.get("n_bits", (hparams or {}).get("n_bits", (hparams or {}).get("n_bits_x", 8)))
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise CheckpointError(f"{source}: n_bits is {n_bits!r:.40}; expected an integer from 1 to 16")
    try:
        config = config_from_layout(layout, n_bits)
    except (ValueError, TypeError, OverflowError) as err:
        raise CheckpointError(f"{source}: unusable Glow layout ({err})") from None
    with torch.device("meta"):
        glow = Glow(config)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        glow.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        summary = str(err).splitlines()[1:3]
        raise CheckpointError(f"{source}: does not match a y0ast Glow of the inferred layout "
                              f"({' '.join(s.strip() for s in summary)[:300]})") from None
    generator = GlowGenerator(glow, float(opts.get("temperature", DEFAULT_TEMPERATURE)))
    return generator.eval()


def load_glow_y0ast_file(path: str | Path, hparams_path: str | Path | None = None,
                         **opts: Any) -> GlowGenerator:
    """Read a y0ast `.pt`/`.pth` state dict (and optionally its `hparams.json`) from disk."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; expected a y0ast Glow-PyTorch state dict (.pt)")
    try:
        state = load_torch(path)  # declared sizes checked first, then weights_only
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: not a readable torch state dict ({reason})") from None
    hparams = None
    if hparams_path is not None:
        hparams = read_json(hparams_path, "the y0ast Glow hparams (a JSON object)", CheckpointError)
    return load_glow_y0ast(state, hparams, **{"source": str(path), **opts})
