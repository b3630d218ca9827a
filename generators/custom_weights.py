"""The weights of a MODULE:CALLABLE generator (`generators.custom`): state dicts with the buffers `state_dict` leaves
out, and the `--weights` file, a safetensors state dict (nothing in it can run).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from patchscope.common.errors import InputError
from patchscope.common.userfiles import check_regular


def with_loose_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus the buffers it leaves out (non-persistent, e.g. StyleGAN2's `w_avg`, which finetuning's
    average moves): a reload must get them back too."""
    state = dict(module.state_dict())
    state.update({k: v for k, v in module.named_buffers() if k not in state})
    return state


def load_with_loose_buffers(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """`load_state_dict(strict=True)`, then the non-persistent buffers the weights hold (files without them keep the
    module's own)."""
    persistent = set(module.state_dict())
    loose = {k: v for k, v in module.named_buffers() if k not in persistent}
    extra = {k: weights[k] for k in loose if k in weights}
    module.load_state_dict({k: v for k, v in weights.items() if k not in extra}, strict=True)
    with torch.no_grad():
        for name, value in extra.items():
            if value.shape != loose[name].shape:
                raise RuntimeError(f"buffer {name}: shape {list(value.shape)}, the network's {list(loose[name].shape)}")
            loose[name].copy_(value)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors state dict (nothing in it can run); one line of InputError for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_regular(path, "generator weights (.safetensors)")
    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{path}: not a safetensors state dict ({one_line(err)}); --weights takes the "
                         f"generator.safetensors a finetune of this generator wrote") from None


def one_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), at most 300 characters."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
