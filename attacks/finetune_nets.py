"""The networks a `GeneratorFinetuner` works with besides the ones it is given: the copies of the generator it trains
and averages, and what `--compile` compiles.

`--compile` compiles the generator's forward of the training steps and the frozen classifier
(`common.compiled.maybe_compile`: uncompiled, after one warning, where the compiler cannot run or its first call
fails); both take a single backward. The discriminator is never compiled: WGAN-GP's gradient penalty and R1 take a
double backward (`create_graph=True`), which torch.compile does not support. A compiled network is a
`CompiledOrEager` around the module itself, sharing its parameters: what Adam trains, what the moving average
follows, whose gradients are summed over the ranks under torchrun (`finetune_ddp.sync_gradients`) and what is saved
are the modules themselves, never a wrapper, so saved state dict keys are those of an uncompiled run.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from patchscope.common.compiled import CompiledOrEager, maybe_compile
from patchscope.generators.base import Generator


def copy_without_discriminator(generator: Generator) -> Generator:
    """A deep copy with no `.discriminator`, so its parameters are the generator's alone."""
    discriminator, generator.discriminator = generator.discriminator, None
    try:
        return copy.deepcopy(generator)
    finally:
        generator.discriminator = discriminator


def compiled_step_networks(generator: Generator, classifier: nn.Module, enabled: bool,
                           device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the generator's forward, the classifier) as the steps call them: compiled when `enabled`, else themselves."""
    return (maybe_compile(generator, enabled, device, "the generator"),
            maybe_compile(classifier, enabled, device, "the classifier"))


def runs_compiled(*networks: nn.Module) -> bool:
    """Whether one of `networks` (`compiled_step_networks`' results) runs compiled: asked for, the compiler runs
    here and its first call, if made yet, did not fall back."""
    return any(isinstance(net, CompiledOrEager) and net.compiled for net in networks)
