"""Generator sampling throughput: images/s and GFLOP/img for every architecture, random weights.

Run: `python benchmarks/bench_generators.py [--device cuda] [--sizes small,full] [--archs pgan_zoo,stylegan2]`.
Times what `generators.sampling` does per chunk (forward + rounding to uint8); nothing is asserted.
"""
from __future__ import annotations

import argparse
import io
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from patchscope.common.device import resolve_device
from patchscope.generators.base import Generator
from patchscope.generators.glow.model import Glow, GlowConfig, GlowGenerator, openai_celebahq_config
from patchscope.generators.io.safe_pickle import PickledRecord
from patchscope.generators.pgan.tf import load_pgan_tf
from patchscope.generators.pgan.zoo import build_pgan_zoo
from patchscope.generators.sampling import LatentSource, resolve_options, sampling_arithmetic, to_pixels
from patchscope.generators.stylegan.model import StyleGAN, StyleGANConfig
from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator, nvlabs_channels

# The published sizes: pytorch_GAN_zoo hub PGAN (celebAHQ 256 and 512), the official TF PGAN and
# StyleGAN CelebA-HQ/FFHQ 1024, StyleGAN2 FFHQ config-f 1024, openai's CelebA-HQ Glow 256.
FULL = {"pgan_zoo": (256, 512), "pgan_tf": (1024,), "stylegan": (1024,), "stylegan2": (1024,), "glow": (256,)}
TF_FMAP_BASE, TF_FMAP_MAX = 8192, 512  # progressive_growing_of_gans defaults (CelebA-HQ)


def tf_nf(stage: int) -> int:
    return min(TF_FMAP_BASE // 2 ** stage, TF_FMAP_MAX)


def _tf_record(name: str, build: str, resolution: int, variables: list[tuple[str, np.ndarray]]) -> PickledRecord:
    state = {"name": name, "build_func_name": build, "variables": variables,
             "static_kwargs": {"resolution": resolution, "num_channels": 3, "latent_size": 512}}
    return PickledRecord("dnnlib.tflib.network", "Network", state=state)


def build_pgan_tf(resolution: int) -> Generator:
    """`G_paper` as the official CelebA-HQ pickle lays it out (non-fused up-scaling), random weights,
    read through the real loader from in-memory records."""
    rng = np.random.RandomState(0)
    log2 = int(math.log2(resolution))

    def conv(scope: str, k: int, c_in: int, c_out: int) -> list[tuple[str, np.ndarray]]:
        return [(f"{scope}/weight", rng.randn(k, k, c_in, c_out).astype(np.float32)),
                (f"{scope}/bias", np.zeros(c_out, np.float32))]

    g = [("4x4/Dense/weight", rng.randn(512, 16 * tf_nf(1)).astype(np.float32)),
         ("4x4/Dense/bias", np.zeros(tf_nf(1), np.float32)), *conv("4x4/Conv", 3, tf_nf(1), tf_nf(1))]
    d = [*conv("4x4/Conv", 3, tf_nf(1) + 1, tf_nf(1)),
         ("4x4/Dense0/weight", rng.randn(16 * tf_nf(1), tf_nf(0)).astype(np.float32)),
         ("4x4/Dense0/bias", np.zeros(tf_nf(0), np.float32)),
         ("4x4/Dense1/weight", rng.randn(tf_nf(0), 1).astype(np.float32)), ("4x4/Dense1/bias", np.zeros(1, np.float32))]
    for res in range(2, log2 + 1):
        lod = log2 - res
        g += conv(f"ToRGB_lod{lod}", 1, tf_nf(res - 1), 3)
        d += conv(f"FromRGB_lod{lod}", 1, 3, tf_nf(res - 1))
        if res > 2:
            scope = f"{2 ** res}x{2 ** res}"
            g += conv(f"{scope}/Conv0", 3, tf_nf(res - 2), tf_nf(res - 1)) + conv(f"{scope}/Conv1", 3, tf_nf(res - 1),
                                                                                     tf_nf(res - 1))
            d += conv(f"{scope}/Conv0", 3, tf_nf(res - 1), tf_nf(res - 1)) + conv(f"{scope}/Conv1", 3, tf_nf(res - 1),
                                                                                     tf_nf(res - 2))
    gs = _tf_record("Gs", "G_paper", resolution, g)
    return load_pgan_tf((gs, _tf_record("D", "D_paper", resolution, d), gs))


def build(arch: str, resolution: int) -> Generator:
    """A randomly initialised generator of the published layout at `resolution`."""
    if arch == "pgan_zoo":
        return build_pgan_zoo(resolution)[0]
    if arch == "pgan_tf":
        return build_pgan_tf(resolution)
    if arch == "stylegan":
        return StyleGAN(StyleGANConfig(resolution=resolution))
    if arch == "stylegan2":  # config-f: NVlabs channel_base 32768 (rosinality's channel multiplier 2)
        return StyleGAN2Generator(StyleGAN2Config(size=resolution, style_dim=512, n_mlp=8,
                                                  channels=nvlabs_channels(resolution)))
    if arch == "glow":  # openai's widths; levels down to a 4x4 top latent as at 256 px
        openai = openai_celebahq_config()
        config = openai if resolution == openai.resolution else GlowConfig(
            resolution=resolution, hidden_channels=openai.hidden_channels, steps=openai.steps,
            levels=int(math.log2(resolution)) - 2, coupling=openai.coupling, permutation=openai.permutation,
            lu_decomposed=openai.lu_decomposed, learn_top=openai.learn_top, n_bits=openai.n_bits)
        return GlowGenerator(Glow(config))
    raise SystemExit(f"unknown architecture {arch!r}; choose from {', '.join(FULL)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampler(generator: Generator, batch: int, device: torch.device) -> Callable[[], np.ndarray]:
    """One sampling chunk as `sample_dataset` runs it: latents in, uint8 pixels on the host out."""
    z, extra = LatentSource(generator, seed=0).take(batch)
    z = z.to(device)
    extra = {k: [t.to(device) for t in v] for k, v in extra.items()}
    options = resolve_options(generator, None)

    def step() -> np.ndarray:
        with torch.no_grad():
            return to_pixels(generator(z, **options, **extra))
    return step


def flops_per_image(generator: Generator, device: torch.device) -> float | None:
    try:
        with FlopCounterMode(display=False) as counter:
            sampler(generator, 1, device)()
        return counter.get_total_flops()
    except Exception:  # some ops have no FLOP formula on some torch versions: report "-"
        return None


def _png_seconds(pixels: np.ndarray) -> float:
    began = time.perf_counter()
    Image.fromarray(pixels).save(io.BytesIO(), format="PNG")
    return time.perf_counter() - began


def measure(arch: str, resolution: int, batch: int, device: torch.device, precision: str, warmup: int,
            iters: int, count_flops: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    # no parameter needs a gradient: also keeps FlopCounterMode's module hooks off leaf parameters
    generator = build(arch, resolution).to(device).eval().requires_grad_(False)
    step = sampler(generator, batch, device)
    with sampling_arithmetic(device, precision):
        for _ in range(warmup):
            pixels = step()
        _sync(device)
        began = time.perf_counter()
        for _ in range(iters):
            pixels = step()
        _sync(device)
        seconds = (time.perf_counter() - began) / iters
        flops = flops_per_image(generator, device) if count_flops else None
    png_ms = min(_png_seconds(pixels[0]) for _ in range(3)) * 1e3  # what a writer thread then pays per image
    return {"arch": arch, "resolution": resolution, "batch": batch, "images_per_s": batch / seconds,
            "ms_per_image": seconds / batch * 1e3, "gflop_per_image": flops / 1e9 if flops else None,
            "gflops": flops * batch / seconds / 1e9 if flops else None, "png_ms": png_ms,
            "params_m": sum(p.numel() for name, p in generator.named_parameters()
                            if not name.startswith("discriminator.")) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--archs", default=",".join(FULL), help=f"comma list of {', '.join(FULL)}")
    parser.add_argument("--sizes", default="small", help="small and/or full (the published resolutions)")
    parser.add_argument("--small", type=int, default=64, help="resolution of the small runs")
    parser.add_argument("--batch", type=int, help="images per call [default: 1 on CPU, 16 on CUDA]")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one more forward each)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 1)
    sizes = args.sizes.split(",")
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"{args.precision}, warm-up {args.warmup}, timed iterations {args.iters}")
    print(f"{'architecture':<12} {'res':>5} {'batch':>5} {'params':>8} {'images/s':>9} {'ms/img':>9} "
          f"{'GFLOP/img':>10} {'GFLOP/s':>8} {'PNG ms':>7}")
    for arch in args.archs.split(","):
        resolutions = ([args.small] if "small" in sizes else []) + (list(FULL[arch]) if "full" in sizes else [])
        for resolution in resolutions:
            r = measure(arch, resolution, batch, device, args.precision, args.warmup, args.iters, not args.no_flops)
            flop = f"{r['gflop_per_image']:>10.2f} {r['gflops']:>8.1f}" if r["gflops"] else f"{'-':>10} {'-':>8}"
            print(f"{arch:<12} {resolution:>5} {batch:>5} {r['params_m']:>7.1f}M {r['images_per_s']:>9.3f} "
                  f"{r['ms_per_image']:>9.1f} {flop} {r['png_ms']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
