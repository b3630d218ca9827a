"""Files of a finetuning run: the generator in its own checkpoint format (zoo `.pt` for PGAN, rosinality
`.pt` for StyleGAN2, the TF variables of an official TF PGAN or StyleGAN; discriminator included), the resume
state, and the metrics log. Used by attacks.finetune.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscope.common.atomic import atomic_open, write_text
from patchscope.forensics.checkpoint import load_resume_state, save_resume_state
from patchscope.common.errors import InputError
from patchscope.generators.base import Generator
from patchscope.generators.pgan.zoo import PGANZooDiscriminator, PGANZooGenerator, save_pgan_zoo
from patchscope.generators.pgan.tf import PGANTFDiscriminator, PGANTFGenerator, save_pgan_tf
from patchscope.generators.stylegan.model import StyleGAN
from patchscope.generators.stylegan2.model import StyleGAN2Discriminator, StyleGAN2Generator
from patchscope.generators.stylegan.discriminator import StyleGANDiscriminator
from patchscope.generators.stylegan.tf import save_stylegan_tf

GENERATOR_FILE = "generator.pt"
RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.jsonl"
RESUME_KIND = "patchscope-finetune-resume"
# Formats a finetuned generator is written in: pytorch_GAN_zoo for PGAN; rosinality for StyleGAN2,
# whichever file it came from (NVlabs pickles map one to one onto it and cannot be written without code);
# an official TF PGAN or StyleGAN as its TF variables (`save_pgan_tf`, `save_stylegan_tf`), since a TF pickle
# carries code.
WRITTEN_FORMATS = {PGANZooGenerator: "pgan_zoo", StyleGAN2Generator: "sg2_rosinality",
                   PGANTFGenerator: "pgan_tf_torch", StyleGAN: "stylegan_tf_torch"}


def written_format(generator: Generator) -> str:
    """The checkpoint format a finetuned `generator` is saved in; other architectures are refused."""
    for cls, name in WRITTEN_FORMATS.items():
        if isinstance(generator, cls):
            if name == "stylegan_tf_torch" and not hasattr(generator, "tf_kwargs"):
                raise InputError("a StyleGAN (v1) is written back as the TF variables it was loaded from; this one "
                                 "was not loaded from a TF pickle")
            return name
    raise InputError(f"finetuning writes pytorch_GAN_zoo PGAN, official TF PGAN and StyleGAN, and StyleGAN2 "
                     f"(rosinality) checkpoints; "
                     f"a {type(generator).__name__} ({generator.format}) cannot be saved in its own format")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.startswith("discriminator.")}


def save_generator_checkpoint(path: str | os.PathLike, average: Generator, trained: Generator,
                              discriminator: nn.Module) -> Path:
    """Write the finetuned networks in the generator's own format, atomically: the averaged generator
    is what `load_generator(path)` returns (zoo `avgG`, rosinality `g_ema`); the trained one
    (`netG`, `g`) and the discriminator (`netD`, `d`) sit beside it, so training can go on from the file."""
    path = Path(path)
    fmt = written_format(average)
    if fmt == "pgan_zoo":
        if not isinstance(discriminator, PGANZooDiscriminator):
            raise ValueError(f"a zoo checkpoint needs a PGANZooDiscriminator, not {type(discriminator).__name__}")
        return save_pgan_zoo(average, path, net_generator=trained, discriminator=discriminator)
    if fmt == "pgan_tf_torch":
        if not isinstance(discriminator, PGANTFDiscriminator):
            raise ValueError(f"a TF PGAN file needs a PGANTFDiscriminator, not {type(discriminator).__name__}")
        return save_pgan_tf(average, path, net_generator=trained, discriminator=discriminator)
    if fmt == "stylegan_tf_torch":
        if not isinstance(discriminator, StyleGANDiscriminator):
            raise ValueError(f"a TF StyleGAN file needs a StyleGANDiscriminator, not {type(discriminator).__name__}")
        return save_stylegan_tf(average, path, net_generator=trained, discriminator=discriminator)
    if not isinstance(discriminator, StyleGAN2Discriminator):
        raise ValueError(f"a rosinality checkpoint needs a StyleGAN2Discriminator, not {type(discriminator).__name__}")
    state = {"g": _tensors(trained), "d": _tensors(discriminator), "g_ema": _tensors(average),
             "latent_avg": average.w_avg.detach().cpu().clone()}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)
    return path


def network_state(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict plus the buffers it leaves out (StyleGAN2's `w_avg` is not persistent)."""
    state = _tensors(module)
    extra = {k: v.detach().cpu().clone() for k, v in module.named_buffers()
             if k not in state and not k.startswith("discriminator.")}
    return {"state": state, "buffers": extra}


def load_network_state(module: nn.Module, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    module.load_state_dict(saved["state"], strict=True)
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in saved["buffers"].items():
            buffers[name].copy_(value)


def save_resume(out: Path, state: dict[str, Any]) -> None:
    save_resume_state(out / RESUME_FILE, {"kind": RESUME_KIND, **state})


def load_resume(out: Path) -> dict[str, Any]:
    """The resume state in OUT (read with `weights_only`), or an InputError naming the file."""
    state = load_resume_state(out / RESUME_FILE)
    if not isinstance(state, dict) or state.get("kind") != RESUME_KIND:
        raise InputError(f"{out / RESUME_FILE}: not the resume state of a finetuning run")
    return state


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines up to `step` (a resumed run repeats the steps after it); returns them."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in kept if record.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
