"""Initial weights from a file the user names (`train --init-weights FILE`): matched to a model by key and shape.

Used by `forensics.train` before the first epoch. Nothing is downloaded and nothing in the file is executed
(`torch.load(weights_only=True)` or safetensors).

A file fits a model when it holds every tensor of the model's backbone (everything but the `convout` head,
which always starts from the model's own init) under the same name and shape, and nothing more under the
backbone's top-level modules. So a torchvision resnet18 file fits `resnet18` and the truncated
`resnet18_layer1`/`_layer2` (its `layer2`..`layer4` and `fc` are simply not used), but not `resnet34_layer1`
(`layer1.2.*` missing) nor `resnet18_layer1` from a resnet34 file (`layer1.2.*` left over).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from patchscope.common.errors import InputError
from patchscope.common.userfiles import read_regular

log = logging.getLogger("patchscope.pretrained")

MAX_BYTES = 4 << 30
HEAD = "convout"
_WRAPPERS = ("state_dict", "model")  # {"state_dict": {...}} (Lightning, many repos), {"model": {...}} (CNNDetection)
# Where each family's ImageNet weights are published, for the error message.
PUBLISHED = {
    "resnet18": "torchvision's resnet18-f37072fd.pth",
    "resnet34": "torchvision's resnet34-b627a593.pth",
    "resnet50": "torchvision's resnet50-0676ba61.pth or resnet50-11ad3fa6.pth",
    "wang2020": "torchvision's resnet50-0676ba61.pth or resnet50-11ad3fa6.pth",
    "xception": "xception-43020ad28.pth of Cadene's pretrained-models.pytorch",
}


def without_data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from inside DataParallel (every key under `module.`) with that prefix taken off."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a torch state dict (possibly wrapped), by name, on the CPU."""
    path = Path(path)
    data = read_regular(path, "a weight file (a torchvision .pth state dict or .safetensors)", MAX_BYTES)
    try:
        if path.suffix == ".safetensors":
            loaded = load_safetensors_bytes(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file (SafetensorError, UnpicklingError...): name it
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a readable weight file ({reason})") from None
    for key in _WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a state dict of named tensors")
    tensors = without_data_parallel({str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    if not tensors:
        raise InputError(f"{path}: holds no tensors (expected a state dict of named tensors)")
    return tensors


def _fit_shape(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """`source` shaped as `target`, or None. A 1x1 conv stored as a matrix (Cadene's Xception file keeps the
    pointwise weights as out x in) is taken as the conv it is."""
    if source.shape == target.shape:
        return source
    if target.dim() == 4 and target.shape[2:] == (1, 1) and source.shape == target.shape[:2]:
        return source[:, :, None, None]
    return None


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(n) for n in tensor.shape) or "scalar"


def matching_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path
                     ) -> dict[str, torch.Tensor]:
    """The file's tensors for the model's backbone, checked to fit it; one InputError line when they do not."""
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if k.split(".")[0] != HEAD}
    roots = {k.split(".")[0] for k in wanted}
    used: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, target in wanted.items():
        if key not in tensors:
            if not key.endswith("num_batches_tracked"):  # older files lack the counters; they start at 0
                missing.append(key)
            continue
        fitted = _fit_shape(tensors[key], target)
        if fitted is None:
            mismatched.append(f"{key}: {_shape(tensors[key])} in the file, {_shape(target)} in the model")
        elif fitted.is_floating_point() and not bool(torch.isfinite(fitted).all()):
            raise InputError(f"{source}: {key} holds NaN or infinite values; expected finite weights")
        else:
            used[key] = fitted
    extra = [k for k in tensors if k.split(".")[0] in roots and k not in state]
    if missing or mismatched or extra:
        counted = []
        if missing:
            counted.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if mismatched:
            counted.append(f"{len(mismatched)} of another shape (e.g. {mismatched[0]})")
        if extra:
            counted.append(f"{len(extra)} in the file that it does not have (e.g. {extra[0]})")
        name = getattr(model, "name", type(model).__name__)
        family = next((PUBLISHED[k] for k in PUBLISHED if name.startswith(k)), None)
        hint = f"; expected {family}" if family else "; it has no published weights to start from"
        raise InputError(f"{source}: does not fit {name} ({len(wanted)} tensors besides its head): "
                         f"{', '.join(counted)}{hint}")
    return used


def load_init_weights(model: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Read `path` and check it fits `model` (see the module doc); returns the tensors `apply_init_weights` copies."""
    tensors = read_weight_file(path)
    used = matching_tensors(model, tensors, path)
    unused = sorted(k for k in tensors if k not in used)
    log.info("%s: %d tensors fit %s%s", path, len(used), getattr(model, "name", "the model"),
             f"; {len(unused)} not used ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''})" if unused else "")
    return used


def apply_init_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checked tensors into the model (in its dtype and on its device); the head keeps its init."""
    model.load_state_dict(tensors, strict=False)
