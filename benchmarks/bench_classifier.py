"""Patch classifier throughput: training and evaluation images/s with FLOP utilisation.

Run: `python benchmarks/bench_classifier.py [--device cuda] [--models ...] [--sizes 299,128]`.
Prints one table row per (model, size, mode, variant); nothing here is asserted.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from patchscope.common.device import resolve_device
from patchscope.common.labels import FAKE, REAL, targets
from patchscope.forensics.models import build_model
from patchscope.forensics.scoring import patch_cross_entropy

# name: (memory format, autocast bf16, torch.compile)
VARIANTS = {
    "nchw_fp32": (torch.contiguous_format, False, False),  # what the public code runs
    "cl_fp32": (torch.channels_last, False, False),         # patchscope's default on CPU
    "cl_bf16": (torch.channels_last, True, False),          # patchscope's default on CUDA
    "cl_fp32_compile": (torch.channels_last, False, True),
    "cl_bf16_compile": (torch.channels_last, True, True),
}


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s: the machine's practical ceiling for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def make_step(name: str, size: int, batch: int, mode: str, variant: str, device: torch.device):
    """One step of `mode` (train: forward + backward + Adam; eval: forward) on random tensors, as a callable."""
    memory_format, bf16, compile_ = VARIANTS[variant]
    model = build_model(name, seed=0).to(device, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    # half real, half fake
    y = torch.cat([targets(batch // 2, REAL, device), targets(batch - batch // 2, FAKE, device)])
    net = torch.compile(model) if compile_ else model
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if mode == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            with cast():
                logits = net(x)
            loss = patch_cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with cast():
                net(x)
    return step


def bench(name: str, size: int, batch: int, mode: str, variant: str, device: torch.device,
          warmup: int, iters: int) -> float:
    """Seconds per step (train: forward + backward + Adam; eval: forward)."""
    return time_steps(make_step(name, size, batch, mode, variant, device), device, warmup, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="xception_block2,resnet18_layer1")
    parser.add_argument("--sizes", default="299,128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--variants", default="nchw_fp32,cl_fp32,cl_bf16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    peak_fp32 = matmul_peak(device, torch.float32)
    peak_bf16 = matmul_peak(device, torch.bfloat16)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"measured matmul peak: fp32 {peak_fp32 / 1e12:.2f} TFLOP/s, bf16 {peak_bf16 / 1e12:.2f} TFLOP/s")
    print(f"{'model':<16} {'px':>4} {'mode':<5} {'variant':<16} {'s/step':>8} {'img/s':>9} "
          f"{'GFLOP/img':>9} {'util':>7}")
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            flops = forward_flops(build_model(name), size)
            for mode in args.modes.split(","):
                step_flops = flops * (3 if mode == "train" else 1) * args.batch  # training ~ 3x forward
                for variant in args.variants.split(","):
                    seconds = bench(name, size, args.batch, mode, variant, device, args.warmup, args.iters)
                    peak = peak_bf16 if VARIANTS[variant][1] else peak_fp32
                    print(f"{name:<16} {size:>4} {mode:<5} {variant:<16} {seconds:>8.3f} "
                          f"{args.batch / seconds:>9.1f} {flops / 1e9:>9.2f} "
                          f"{step_flops / seconds / peak:>6.1%}", flush=True)


if __name__ == "__main__":
    main()
