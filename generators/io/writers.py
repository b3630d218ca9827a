"""Writing a generator back in its own checkpoint format: zoo `.pt` for PGAN, rosinality `.pt` for StyleGAN2,
the TF variables of an official TF PGAN or StyleGAN; discriminator included. A MODULE:CALLABLE generator
(`generators.custom`) is written as its network's state dict in safetensors, which `--weights` loads back into
what the same callable builds. Used by finetuning.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from patchscope.common.atomic import atomic_open, write_bytes
from patchscope.common.errors import InputError
from patchscope.generators.base import Generator
from patchscope.generators.custom import WRITTEN_FORMAT, module_source, user_state_dict
from patchscope.generators.pgan.tf import PGANTFDiscriminator, PGANTFGenerator, save_pgan_tf
from patchscope.generators.pgan.zoo import PGANZooDiscriminator, PGANZooGenerator, save_pgan_zoo
from patchscope.generators.stylegan.discriminator import StyleGANDiscriminator
from patchscope.generators.stylegan.model import StyleGAN
from patchscope.generators.stylegan.tf import save_stylegan_tf
from patchscope.generators.stylegan2.model import StyleGAN2Discriminator, StyleGAN2Generator

# Formats a finetuned generator is written in: pytorch_GAN_zoo for PGAN; rosinality for StyleGAN2,
# whichever file it came from (NVlabs pickles map one to one onto it and cannot be written without code);
# an official TF PGAN or StyleGAN as its TF variables (`save_pgan_tf`, `save_stylegan_tf`), since a TF pickle
# carries code.
WRITTEN_FORMATS = {PGANZooGenerator: "pgan_zoo", StyleGAN2Generator: "sg2_rosinality",
                   PGANTFGenerator: "pgan_tf_torch", StyleGAN: "stylegan_tf_torch"}


def written_format(generator: Generator) -> str:
    """The checkpoint format a finetuned `generator` is saved in; other architectures are refused."""
    if module_source(generator) is not None:
        return WRITTEN_FORMAT
    for cls, name in WRITTEN_FORMATS.items():
        if isinstance(generator, cls):
            if name == "stylegan_tf_torch" and not hasattr(generator, "tf_kwargs"):
                raise InputError("a StyleGAN (v1) is written back as the TF variables it was loaded from; this one "
                                 "was not loaded from a TF pickle")
            return name
    raise InputError(f"finetuning writes pytorch_GAN_zoo PGAN, official TF PGAN and StyleGAN, and StyleGAN2 "
                     f"(rosinality) checkpoints; "
                     f"a {type(generator).__name__} ({generator.format}) cannot be saved in its own format")


def file_name(generator: Generator) -> str:
    """The name of a finetuned generator's file: generator.safetensors for MODULE:CALLABLE, else generator.pt."""
    return f"generator.{WRITTEN_FORMAT}" if written_format(generator) == WRITTEN_FORMAT else "generator.pt"


def check_writable(generator: Generator) -> str:
    """`written_format`, refusing a generator without a discriminator in a format that must hold one."""
    fmt = written_format(generator)
    if generator.discriminator is None and fmt not in (WRITTEN_FORMAT, "sg2_rosinality"):
        raise InputError(f"a {fmt} checkpoint holds the discriminator beside the generator; this "
                         f"{type(generator).__name__} has none, so it cannot be written back")
    return fmt


def plain_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.startswith("discriminator.")}


def save_generator_checkpoint(path: str | os.PathLike, average: Generator, trained: Generator,
                              discriminator: nn.Module | None) -> Path:
    """Write the finetuned networks in the generator's own format, atomically: the averaged generator
    is what `load_generator(path)` returns (zoo `avgG`, rosinality `g_ema`); the trained one
    (`netG`, `g`) and the discriminator (`netD`, `d`) sit beside it, so training can go on from the file.
    A MODULE:CALLABLE generator: the averaged network's state dict (discriminator under `discriminator.`) in
    safetensors; a rosinality file may go without `d` (finetuned without a discriminator)."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    fmt = written_format(average)
    if fmt == WRITTEN_FORMAT:
        write_bytes(path, safetensors_bytes(user_state_dict(average, discriminator)))
        return path
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
    if discriminator is not None and not isinstance(discriminator, StyleGAN2Discriminator):
        raise ValueError(f"a rosinality checkpoint needs a StyleGAN2Discriminator, not {type(discriminator).__name__}")
    state = {"g": plain_tensors(trained), "g_ema": plain_tensors(average),
             "latent_avg": average.w_avg.detach().cpu().clone()}
    if discriminator is not None:
        state = {"g": state["g"], "d": plain_tensors(discriminator), "g_ema": state["g_ema"],
                 "latent_avg": state["latent_avg"]}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)
    return path
