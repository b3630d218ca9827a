"""One benchmark command: every workload, its reference step, and the device's own ceilings, in one table.

Run: `python benchmarks/run.py [--device cuda] [--workloads train,eval,files] [--sizes 128,299] [--json F]`.

Per workload: images/s, ms/step, peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak
resident set while the workload ran, sampled from /proc, else resource.getrusage's high-water mark), and
- classifiers (memory-bound): an estimate of the activation bytes a step moves against the copy bandwidth
  measured here, and the same step in the public code's layout (fp32, NCHW, eager; for training from files also
  a PIL decode + Lanczos resize of every image at every step) timed in the same run, so every figure has a ratio;
- generators (compute-bound): model FLOP utilisation against a matmul peak measured here.
Nothing is asserted; compare ratios within one run, not absolute times across machines.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_*.py scripts

import bench_attacks  # noqa: E402
import bench_classifier  # noqa: E402
import bench_generators  # noqa: E402

from patchscope.common.atomic import write_text  # noqa: E402
from patchscope.common.device import configure_backends, resolve_device, resolve_precision  # noqa: E402
from patchscope.forensics import data  # noqa: E402
from patchscope.forensics.device_crop import UncroppedBatch, UncroppedItems, to_device_batch  # noqa: E402
from patchscope.forensics.models import build_model  # noqa: E402
from patchscope.forensics.scoring import patch_cross_entropy  # noqa: E402
from patchscope.generators.sampling import sampling_arithmetic  # noqa: E402

WORKLOADS = ("train", "eval", "files", "loading", "generators", "exaggerate", "finetune", "ddp")
CLASSIFIERS = ("xception_block1", "xception_block2", "resnet18_layer1")
GENERATORS = ("pgan_zoo", "stylegan2", "glow")
PUBLISHED = {"pgan_tf": 1024, "stylegan2": 1024}  # --published-sizes: the papers' 1024 px generators
TRAIN_BYTES_FACTOR = 3  # activation traffic of a training step: forward write, backward read, gradient write
EVAL_BYTES_FACTOR = 1   # an eval step: each module output written once (reads by the next module not counted)
FILE_PX = 256           # the PNGs written for the from-files workloads


# ----------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of `step` after `warmup` untimed calls; CUDA events on the GPU, wall clock elsewhere."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) / steps


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory while the block runs, in MiB: CUDA max_memory_allocated, or on the CPU the resident set
    sampled every few ms (where /proc is missing: getrusage's high-water mark of the whole process so far)."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")
        self._stop = threading.Event()
        self._peak = 0

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_bytes() is not None:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._peak:
            self._stop.set()
            self._thread.join()
            self.mib = max(self._peak, _rss_bytes() or 0) / 2**20
        else:  # ru_maxrss: KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mib = rss / (2**20 if sys.platform == "darwin" else 2**10)


def copy_bandwidth(device: torch.device, mib: int, reps: int = 5) -> float:
    """Measured device memory bandwidth, bytes/s, of a large tensor copy (each byte read once, written once)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_steps(lambda: dst.copy_(src), device, warmup=2, steps=reps)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Measured dense matmul FLOP/s (2·n³ per product): the practical compute ceiling for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_steps(lambda: a @ b, device, warmup=2, steps=reps)


def classifier_traffic(name: str, size: int, device: torch.device, variant: str) -> tuple[float, float]:
    """(FLOPs, activation bytes) of one forward pass on one image in `variant`'s layout and precision: FLOPs from
    FlopCounterMode (a multiply-add counts 2), bytes as the sum over leaf modules of their output sizes."""
    memory_format, bf16, _ = bench_classifier.VARIANTS[variant]
    model = build_model(name, seed=0).to(device, memory_format=memory_format).eval()
    total = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    x = torch.randn(1, 3, size, size, device=device).contiguous(memory_format=memory_format)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad(), cast:
        model(x)
    for handle in handles:
        handle.remove()
    return float(counter.get_total_flops()), float(total[0])


# ----------------------------------------------------------------------------- the run

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = device = resolve_device(args.device)
        configure_backends(device)
        self.precision = resolve_precision("auto", device)
        self.ours = "cl_bf16" if self.precision == "bf16" else "cl_fp32"
        self.cuda = device.type == "cuda"
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.failed: list[dict[str, str]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="patchscope_bench_"))
        big = 8192 if self.cuda else 2048  # smaller CPU products fall well short of the peak
        print(f"measuring the device: matmul peak ({big}^3, fp32 and bf16), copy bandwidth ...", flush=True)
        with sampling_arithmetic(device, "fp32"):  # true fp32, no TF32 (configure_backends allows it): as fp32 rows run
            fp32 = matmul_peak(device, torch.float32, big)
        self.peak = {"fp32": fp32, "bf16": matmul_peak(device, torch.bfloat16, big)}
        self.bandwidth = copy_bandwidth(device, 1024 if self.cuda else 128)

    def meta(self) -> dict[str, Any]:
        return {"device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.cuda else cpu_model(),
                "cpu_model": cpu_model(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "python": platform.python_version(), "precision": self.precision,
                "matmul_peak_tflops": {k: v / 1e12 for k, v in self.peak.items()},
                "copy_bandwidth_gbs": self.bandwidth / 1e9, "steps": self.args.steps, "warmup": self.args.warmup,
                "bytes_estimate": f"activation bytes per step = sum of leaf-module output sizes x element size x "
                                  f"{TRAIN_BYTES_FACTOR} (train: forward write, backward read, gradient write) or "
                                  f"x {EVAL_BYTES_FACTOR} (eval); weights, optimizer state and re-reads by the next "
                                  "module are left out, so it is a lower bound",
                "argv": sys.argv[1:]}

    def measure(self, step: Callable[[], object], batch: int, steps: int | None = None,
                warmup: int | None = None) -> dict[str, float]:
        with PeakMemory(self.device) as memory:
            seconds = time_steps(step, self.device, self.args.warmup if warmup is None else warmup,
                                 steps or self.args.steps)
        return {"images_per_s": batch / seconds, "ms_per_step": seconds * 1e3, "peak_mem_mib": memory.mib}

    def add(self, row: dict[str, Any], reference: dict[str, float] | None = None) -> None:
        if reference is not None:
            row["reference"] = reference
            row["speedup_vs_reference"] = reference["ms_per_step"] / row["ms_per_step"]
        self.results.append(row)
        print(format_row(row), flush=True)
        self.save(complete=False)  # a run cut short (a time limit, a crash) keeps every figure measured so far

    def fail(self, workload: str, error: BaseException) -> None:
        """A workload that raised: recorded with its error, and the next workload runs."""
        self.failed.append({"workload": workload, "error": f"{type(error).__name__}: {error}"[:500]})
        traceback.print_exc()
        print(f"failed {workload}: {self.failed[-1]['error']}", flush=True)
        self.save(complete=False)

    def save(self, complete: bool) -> None:
        if self.args.json:
            figures = {"meta": self.meta(), "complete": complete, "results": self.results,
                       "skipped": self.skipped, "failed": self.failed}
            write_text(self.args.json, json.dumps(_finite(figures), indent=2, allow_nan=False))

    def skip(self, workload: str, reason: str) -> None:
        self.skipped.append({"workload": workload, "reason": reason})
        print(f"skipped {workload}: {reason}", flush=True)

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    # --- classifiers on random tensors

    def classifier(self, mode: str) -> None:
        batch = self.args.batch
        for name in self.args.models.split(","):
            for size in self.args.sizes:
                flops, act_bytes = classifier_traffic(name, size, self.device, self.ours)
                factor = TRAIN_BYTES_FACTOR if mode == "train" else EVAL_BYTES_FACTOR
                rows = []
                for variant in (self.ours, *((f"{self.ours}_compile",) if self.args.compile else ())):
                    row = {"workload": mode, "name": name, "px": size, "batch": batch, "variant": variant}
                    # a compiled step compiles in its warm-up steps: at least one, so it is not timed
                    warmup = max(self.args.warmup, 1) if variant.endswith("_compile") else None
                    row.update(self.measure(bench_classifier.make_step(name, size, batch, mode, variant,
                                                                       self.device), batch, warmup=warmup))
                    self.release()
                    seconds = row["ms_per_step"] / 1e3
                    step_flops = flops * batch * (3 if mode == "train" else 1)  # training ~ 3x the forward
                    row.update(gflop_per_image=flops / 1e9, mfu=step_flops / seconds / self.peak[self.precision],
                               gb_per_step=act_bytes * batch * factor / 1e9,
                               bandwidth_util=act_bytes * batch * factor / seconds / self.bandwidth)
                    rows.append(row)
                reference = self.measure(bench_classifier.make_step(name, size, batch, mode, "nchw_fp32",
                                                                    self.device), batch)
                self.release()
                for row in rows:
                    self.add(row, reference)

    # --- training from image files on disk

    def png_folders(self, count: int, splits: bool = False) -> tuple[Path, Path]:
        """`count` random PNGs at 256 px, half real/ and half fake/ (with train/ and val/ when `splits`)."""
        root = self.tmp / f"png_{count}_{int(splits)}"
        folders = root / "real", root / "fake"
        if root.exists():
            return folders
        from PIL import Image
        rng = np.random.default_rng(0)
        for c, folder in enumerate(folders):
            for i in range(count // 2):
                sub = folder / (("val" if i % 4 == 3 else "train") if splits else "")
                sub.mkdir(parents=True, exist_ok=True)
                base = rng.integers(0, 256, (FILE_PX // 8, FILE_PX // 8, 3), dtype=np.uint8)  # smooth-ish
                img = Image.fromarray(base).resize((FILE_PX, FILE_PX), Image.BILINEAR)
                noise = rng.integers(-8 * c, 8 * c + 1, (FILE_PX, FILE_PX, 3))
                Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)).save(sub / f"{i:05d}.png")
        return folders

    def _loader_workers(self) -> int:
        return self.args.loader_workers if self.args.loader_workers is not None else (4 if self.cuda else 0)

    def _ours_loader(self, real: Path, fake: Path, size: int, batch: int, workers: int, train: bool = True):
        """The library's pipeline: decode and Lanczos-resize each file once into memory (forensics.data), then
        balanced batches of crops from the cache (forensics.batching)."""
        began = time.perf_counter()
        dataset = data.load_split(real, fake, load_size=size, crop_size=size, cache=True, workers=workers,
                                  train=train, seed=0)
        setup = time.perf_counter() - began
        # crop_on auto, as `train`: on CUDA the loader sends uint8 images and the device crops them
        return data.make_loader(dataset, batch, train=train, seed=0, workers=0, device_type=self.device.type,
                                crop_on=self.args.crop_on), setup

    @staticmethod
    def _crop_variant(loader) -> str:
        return "+device crop" if isinstance(loader.dataset, UncroppedItems) else ""

    def _to_input(self, batch, memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of either loader as the model's input on the device, and its labels."""
        if isinstance(batch, UncroppedBatch):
            x, y, _ = to_device_batch(batch, self.device, memory_format)
        else:
            x, y = batch[0].to(self.device, non_blocking=True, memory_format=memory_format), batch[1]
        return x, y

    def _public_loader(self, real: Path, fake: Path, size: int, batch: int, workers: int):
        """The public code's pipeline: every item opens its PNG with PIL and Lanczos-resizes it, every epoch."""
        items = [(p, 0) for p in data.list_images(real)] + [(p, 1) for p in data.list_images(fake)]
        return torch.utils.data.DataLoader(PublicStyleImages(items, size), batch_size=batch, shuffle=True,
                                           num_workers=workers, drop_last=True,
                                           pin_memory=self.cuda, persistent_workers=workers > 0)

    def _file_step(self, loader, model, memory_format, precision, resident: bool = False) -> Callable[[], None]:
        """One training step on the loader's next batch; `resident`: on its first batch, kept on the device."""
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = cycle(loader)
        kept = self._to_input(next(batches), memory_format) if resident else None
        cast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if precision == "bf16" \
            else contextlib.nullcontext
        model.train()

        def step() -> None:
            x, y = kept if resident else self._to_input(next(batches), memory_format)
            y = y.to(self.device, non_blocking=True)
            with cast():
                logits = model(x)
            loss = patch_cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def _fed_steps(self, loader, model, memory_format, precision, batch: int) -> dict[str, float]:
        """The training step from the loader, and `fed`: the same step on one batch already on the device over it,
        how much of the model's own rate the data path delivers (on a GPU, whose model step alone keeps it busy,
        its busy share)."""
        figures = self.measure(self._file_step(loader, model, memory_format, precision), batch)
        alone = self.measure(self._file_step(loader, model, memory_format, precision, resident=True), batch,
                             warmup=max(self.args.warmup, 1))
        return {**figures, "model_alone_ms_per_step": alone["ms_per_step"],
                "fed": alone["ms_per_step"] / figures["ms_per_step"]}

    def files(self) -> None:
        batch, name, workers = self.args.batch, self.args.files_model, self._loader_workers()
        real, fake = self.png_folders(self.args.files)
        for size in self.args.sizes:
            loader, setup = self._ours_loader(real, fake, size, batch, workers)
            model = build_model(name, seed=0).to(self.device, memory_format=torch.channels_last)
            row = {"workload": "files", "name": name, "px": size, "batch": batch,
                   "variant": self.ours + "+cache" + self._crop_variant(loader),
                   "setup_s": setup, "files": self.args.files}
            row.update(self._fed_steps(loader, model, torch.channels_last, self.precision, batch))
            del model, loader
            self.release()
            model = build_model(name, seed=0).to(self.device)
            public = self._public_loader(real, fake, size, batch, workers)
            reference = self._fed_steps(public, model, torch.contiguous_format, "fp32", batch)
            del model, public
            self.release()
            self.add(row, reference)

    def loading(self) -> None:
        """Data loading alone: batches of crops as the model's input on the device (channels_last), no model."""
        batch, workers = self.args.batch, self._loader_workers()
        real, fake = self.png_folders(self.args.files)
        for size in self.args.sizes:
            loader, setup = self._ours_loader(real, fake, size, batch, workers)
            batches, public = cycle(loader), cycle(self._public_loader(real, fake, size, batch, workers))
            row = {"workload": "loading", "name": "decode once + cached crops", "px": size, "batch": batch,
                   "variant": "cache" + self._crop_variant(loader), "setup_s": setup, "files": self.args.files,
                   "setup_images_per_s": self.args.files / setup}
            row.update(self.measure(lambda: self._to_input(next(batches), torch.channels_last), batch))
            self.add(row, self.measure(lambda: self._to_input(next(public), torch.contiguous_format), batch))

    # --- generators

    def generators(self) -> None:
        batch = self.args.gen_batch or (16 if self.cuda else 1)
        runs = [(arch, px) for arch in GENERATORS for px in self.args.gen_sizes]
        if self.args.published_sizes:
            runs += list(PUBLISHED.items())
        precision = self.args.gen_precision
        for arch, px in runs:
            torch.manual_seed(0)
            generator = bench_generators.build(arch, px).to(self.device).eval().requires_grad_(False)
            step = bench_generators.sampler(generator, batch, self.device)
            with sampling_arithmetic(self.device, precision):
                row = {"workload": "generators", "name": arch, "px": px, "batch": batch, "variant": precision}
                row.update(self.measure(step, batch))
                flops = bench_generators.flops_per_image(generator, self.device)
            if flops:
                row.update(gflop_per_image=flops / 1e9,
                           mfu=flops * row["images_per_s"] / self.peak[precision])
            del generator, step
            self.release()
            self.add(row)

    # --- attacks

    def attack(self, workload: str) -> None:
        for size in self.args.attack_sizes:
            setting = bench_attacks.SETTINGS[size]
            batch = self.args.attack_batch or (16 if self.cuda or size == "demo" else 8 if size == "small" else 2)
            function = bench_attacks.WORKLOADS[workload]

            def run(precision: str) -> dict[str, float]:
                with PeakMemory(self.device) as memory:
                    seconds = function(setting, batch, precision, self.device, self.args.steps,
                                       warmup=self.args.warmup)
                self.release()
                return {"images_per_s": batch / seconds, "ms_per_step": seconds * 1e3, "peak_mem_mib": memory.mib}

            row = {"workload": workload, "name": f"PGAN {setting.generator_px}px -> {setting.classifier}",
                   "px": setting.classifier_px, "batch": batch, "variant": self.precision, **run(self.precision)}
            self.add(row, run("fp32"))

    # --- DDP

    def ddp(self) -> None:
        if not torch.distributed.is_available():
            return self.skip("ddp", "torch.distributed is not available in this torch build")
        if importlib.util.find_spec("patchscope.common.distributed") is None:
            return self.skip("ddp", "the library has no DDP support yet (no patchscope.common.distributed)")
        gpus = torch.cuda.device_count() if self.cuda else 0
        many = self.args.ddp_procs or (gpus if self.cuda else 2)
        if self.cuda and not 2 <= many <= gpus:  # NCCL takes one GPU per process
            self.skip("ddp", f"scaling to {many} processes needs {max(many, 2)} GPUs; this machine has {gpus}")
            return
        procs = [1, many]
        real, fake = self.png_folders(self.args.files, splits=True)
        size = min(self.args.sizes)
        base = None
        for n in procs:
            out = self.tmp / f"ddp_{n}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "--no-python", sys.executable, "-c", "from patchscope.cli import main; main()",
                       "train", "--real", str(real), "--fake", str(fake), "--out", str(out),
                       "--model", self.args.files_model, "--load-size", str(size), "--crop-size", str(size),
                       "--batch-size", str(self.args.batch), "--max-epochs", "2", "--device", self.device.type]
            began = time.perf_counter()
            # the same CPU threads in all: torchrun would give each of several processes one thread
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n))}
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.args.ddp_timeout, env=env)
            wall = time.perf_counter() - began
            if done.returncode != 0:
                lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip(" =-")]
                said = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
                raise RuntimeError(f"torchrun with {n} processes failed ({done.returncode}): {said[-1][:300]}")
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            last = lines[-1]  # the second epoch: the first pays for start-up; its images are the global count
            seconds = last["seconds"]
            row = {"workload": "ddp", "name": self.args.files_model, "px": size, "batch": self.args.batch,
                   "variant": f"{n} proc", "images_per_s": last["images_per_s"],
                   "ms_per_step": seconds * 1e3 / max(1, -(-last["images"] // self.args.batch)),
                   "peak_mem_mib": float("nan"), "wall_s": wall}
            base = base or row["images_per_s"]
            row["scaling_vs_1_proc"] = row["images_per_s"] / base
            self.add(row)


class PublicStyleImages(torch.utils.data.Dataset):
    """The public code's per-item work: open with PIL, Lanczos-resize to `size`, random crop, flip, to [-1, 1]."""

    def __init__(self, items: list[tuple[Path, int]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image
        path, label = self.items[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = self.size / min(w, h)
            img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.LANCZOS)
        pixels = np.asarray(img)
        top = np.random.randint(0, pixels.shape[0] - self.size + 1)
        left = np.random.randint(0, pixels.shape[1] - self.size + 1)
        pixels = pixels[top:top + self.size, left:left + self.size]
        if np.random.rand() < 0.5:
            pixels = pixels[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float().div_(127.5).sub_(1)
        return x, label


def cycle(loader) -> Iterator:
    epoch = 0
    while True:
        data.set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- output

COLUMNS = ("workload", "model", "px", "batch", "variant", "img/s", "ms/step", "peak MiB", "MFU",
           "act. GB/step", "% copy BW", "% fed", "reference img/s", "× reference")


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.3g}"


def format_row(row: dict[str, Any]) -> str:
    ref = row.get("reference") or {}
    pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
    cells = [row["workload"], row["name"], str(row["px"]), str(row["batch"]), row["variant"],
             _num(row["images_per_s"]), _num(row["ms_per_step"]), _num(row["peak_mem_mib"], 0),
             pct(row.get("mfu")), _num(row.get("gb_per_step"), 2), pct(row.get("bandwidth_util")), pct(row.get("fed")),
             _num(ref.get("images_per_s")),
             f"{row['speedup_vs_reference']:.2f}×" if "speedup_vs_reference" in row
             else (f"{row['scaling_vs_1_proc']:.2f}× 1 proc" if "scaling_vs_1_proc" in row else "-")]
    return "| " + " | ".join(cells) + " |"


def table(bench: Bench) -> str:
    meta = bench.meta()
    lines = [f"device {meta['device_name']} ({meta['device']}), torch {meta['torch']}, {meta['cpu_threads']} CPU "
             f"threads, precision {meta['precision']}; measured matmul peak fp32 "
             f"{meta['matmul_peak_tflops']['fp32']:.3g} / bf16 {meta['matmul_peak_tflops']['bf16']:.3g} TFLOP/s, "
             f"copy bandwidth {meta['copy_bandwidth_gbs']:.3g} GB/s; reference = fp32 NCHW eager "
             "(from files: + PIL decode and Lanczos resize per image per step; attacks: fp32)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_row(row) for row in bench.results]
    lines += [f"\nskipped {s['workload']}: {s['reason']}" for s in bench.skipped]
    lines += [f"\nFAILED {f['workload']}: {f['error']}" for f in bench.failed]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = (lambda text: [int(v) for v in text.split(",") if v])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--sizes", type=ints, default=[128, 299],
                        help="classifier and from-files input px  [default: 128,299]")
    parser.add_argument("--models", default=",".join(CLASSIFIERS), help="classifiers of train and eval")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement  [default: 3]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first  [default: 1]")
    parser.add_argument("--batch", type=int, help="classifier batch  [default: 256 on CUDA, 32 on CPU]")
    parser.add_argument("--compile", action="store_true",
                        help="train, eval: also time the step under torch.compile (as `train --compile`)")
    parser.add_argument("--files", type=int, help="PNGs (256 px) the from-files workloads read  "
                                                  "[default: 4 batches]")
    parser.add_argument("--files-model", default="xception_block2", help="classifier of files and ddp")
    parser.add_argument("--crop-on", choices=("auto", "host", "device"), default="auto",
                        help="files, loading: where crops are made, as train --crop-on  [default: auto]")
    parser.add_argument("--loader-workers", type=int, help="decoding processes  [default: 4 on CUDA, 0 on CPU]")
    parser.add_argument("--gen-sizes", type=ints, default=[64], help="generator px  [default: 64]")
    parser.add_argument("--gen-batch", type=int, help="[default: 16 on CUDA, 1 on CPU]")
    parser.add_argument("--gen-precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--published-sizes", action="store_true", help="also PGAN and StyleGAN2 at 1024 px")
    parser.add_argument("--attack-sizes", default="demo", help=f"of {', '.join(bench_attacks.SETTINGS)}")
    parser.add_argument("--attack-batch", type=int)
    parser.add_argument("--ddp-procs", type=int, help="processes of the scaled DDP run  [default: the GPUs on CUDA, 2 on CPU]")
    parser.add_argument("--ddp-timeout", type=int, default=600)
    parser.add_argument("--json", help="write every figure, the device, torch version and CPU model here")
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.attack_sizes = args.attack_sizes.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging
    logging.getLogger("patchscope.perceptual").setLevel(logging.ERROR)  # the random-LPIPS warning
    bench = Bench(args)
    args.batch = args.batch or (256 if bench.cuda else 32)
    args.files = args.files or 4 * args.batch
    try:
        for workload in args.workloads.split(","):
            print(f"== {workload}", flush=True)
            try:
                if workload in ("train", "eval"):
                    bench.classifier(workload)
                elif workload in ("exaggerate", "finetune"):
                    bench.attack(workload)
                else:
                    getattr(bench, workload)()
            except Exception as error:  # one broken workload must not cost the others' figures
                bench.fail(workload, error)
                with contextlib.suppress(Exception):  # after a CUDA error this may raise too
                    bench.release()
        print()
        print(table(bench))
        bench.save(complete=True)
        if args.json:
            print(f"\nfigures: {args.json}")
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    return 1 if bench.failed else 0


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be measured) as null, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and value != value else value


if __name__ == "__main__":
    sys.exit(main())
