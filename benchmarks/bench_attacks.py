"""Attack step times: seconds per optimisation step, one function per workload; random weights except the
demo's bundled PGAN.

Run: `python benchmarks/bench_attacks.py [--device cuda] [--workloads exaggerate,finetune]
[--sizes demo,small,256,1024] [--compile]`.
Prints one table row per (workload, size, precision), and with --compile a second one with the networks that
`exaggerate --compile` / `finetune --compile` compile compiled (compiled in the warm-up steps, not timed);
nothing here is asserted.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from patchscope.analysis.demo import BUNDLED_GENERATOR
from patchscope.attacks.finetune import FinetuneSettings, GeneratorFinetuner
from patchscope.attacks.perceptual import load_lpips
from patchscope.attacks.shift import ClassifierInput, ShiftExaggeration
from patchscope.common.device import configure_backends, resolve_device
from patchscope.forensics.models import build_model
from patchscope.generators.io.formats import load_generator
from patchscope.generators.pgan.zoo import build_pgan_zoo


@dataclass(frozen=True)
class Setting:
    """One benchmarked size: the generator's resolution and the classifier that judges it."""

    generator_px: int
    classifier: str
    classifier_px: int  # the classifier's input size: generator output is resized to it
    bundled: bool = False  # the demo's own small PGAN (64 channels at most) instead of the zoo's widths


# demo: the demo's bundled PGAN and classifier. small: the same scale (32 px, xception_block1 at 32 px) with the
# zoo's celebA-HQ channel widths (512) and latent size. 256 and 1024: the published
# pytorch_GAN_zoo and official PGAN celebA-HQ sizes, judged at 299 px as the public code trains.
SETTINGS = {
    "demo": Setting(32, "xception_block1", 32, bundled=True),
    "small": Setting(32, "xception_block1", 32),
    "256": Setting(256, "xception_block2", 299),
    "1024": Setting(1024, "xception_block2", 299),
}


def _pgan(setting: Setting) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(generator, discriminator): random weights at the zoo's widths, or the demo's trained PGAN."""
    if setting.bundled:
        generator = load_generator(BUNDLED_GENERATOR)
        return generator, generator.discriminator
    return build_pgan_zoo(setting.generator_px)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def bench_exaggerate(setting: Setting, batch: int, precision: str, device: torch.device, iters: int,
                     warmup: int = 2, compile: bool = False) -> float:
    """Seconds per exaggerate step: G(z) and G(z − w), the classifier at its input size, LPIPS
    (alex), the backward pass to w and Adam — `ShiftExaggeration.fit` itself, set-up excluded."""
    warmup = max(warmup, 1) if compile else warmup  # compiled in the first calls: never timed
    torch.manual_seed(0)
    generator, _ = _pgan(setting)
    classifier = build_model(setting.classifier, seed=0)
    lpips = load_lpips("alex", device=device, allow_random=True)  # random weights time like real ones
    attack = ShiftExaggeration(generator.eval(), classifier, lpips, lam=1.0,
                               classifier_input=ClassifierInput(setting.classifier_px, setting.classifier_px),
                               device=device, precision=precision, compile=compile)

    def fit(steps: int) -> None:
        attack.fit(steps=steps, batch=batch, lr=0.01, progress=False)

    if warmup:
        fit(warmup)  # warm-up: allocator, cuDNN autotuning
    # A fit also scores its final shift once; the difference of two fits leaves only the steps.
    return (_timed(lambda: fit(1 + iters), device) - _timed(lambda: fit(1), device)) / iters


def bench_finetune(setting: Setting, batch: int, precision: str, device: torch.device, iters: int,
                   warmup: int = 1, compile: bool = False) -> float:
    """Seconds per finetune step (eq. 4): a WGAN-GP critic step with gradient penalty and drift, then a
    generator step with the GAN loss and the classifier's loss at its input size, and the average update —
    `GeneratorFinetuner.run` itself without logging or checkpoint files, set-up excluded."""
    warmup = max(warmup, 1) if compile else warmup  # compiled in the first calls: never timed
    torch.manual_seed(0)
    generator, discriminator = _pgan(setting)
    generator.discriminator = discriminator
    classifier = build_model(setting.classifier, seed=0)
    side = setting.generator_px
    reals = torch.randint(0, 256, (max(2 * batch, 16), 3, side, side), dtype=torch.uint8)
    attack = GeneratorFinetuner(generator, classifier, reals, FinetuneSettings(precision=precision), device=device,
                                classifier_input=ClassifierInput(setting.classifier_px, setting.classifier_px),
                                compile=compile)

    def run(steps: int) -> None:
        attack.run(attack.step + steps, batch, progress=False)

    if warmup:
        run(warmup)  # warm-up: allocator, cuDNN autotuning
    # A run ends by keeping its state as the last good one; the difference of two runs leaves only the steps.
    return (_timed(lambda: run(1 + iters), device) - _timed(lambda: run(1), device)) / iters


WORKLOADS: dict[str, Callable[..., float]] = {
    "exaggerate": bench_exaggerate,
    "finetune": bench_finetune,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--sizes", default="demo,small,256", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--batch", type=int, default=None,
                        help="[default: 16 on CUDA and for demo; on CPU 8 small, 2 larger]")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time each step with what `--compile` compiles compiled (after its warm-up)")
    args = parser.parse_args()
    logging.getLogger("patchscope.perceptual").setLevel(logging.ERROR)  # the random-LPIPS warning
    device = resolve_device(args.device)
    configure_backends(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'workload':<11} {'size':>5} {'G px':>5} {'classifier':<16} {'C px':>5} {'batch':>5} "
          f"{'precision':<9} {'compile':<7} {'s/step':>8} {'img/s':>8}")
    for workload in args.workloads.split(","):
        for size in args.sizes.split(","):
            setting = SETTINGS[size]
            batch = args.batch or (16 if device.type == "cuda" or size == "demo" else 8 if size == "small" else 2)
            for precision in args.precisions.split(","):
                for compile in (False, True) if args.compile else (False,):
                    seconds = WORKLOADS[workload](setting, batch, precision, device, args.iters, compile=compile)
                    print(f"{workload:<11} {size:>5} {setting.generator_px:>5} {setting.classifier:<16} "
                          f"{setting.classifier_px:>5} {batch:>5} {precision:<9} {'yes' if compile else 'no':<7} "
                          f"{seconds:>8.3f} {batch / seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
