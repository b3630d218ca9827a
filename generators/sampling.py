"""Sampling a generator into a PNG dataset `<out>/<split>/<index:06d>.png`, resumable, with a manifest.

Used by `patchscope sample`, the retrain stage and the demo; the folder itself (atomic PNG writes,
the manifest) is `generators.dataset_folder`, shared with `generators.prepare`.

Reproducibility: image i of a split depends only on (generator, options, split seed, i, `chunk`),
never on `batch_size`, the requested count or where an interrupted run resumed. Kernels round
differently for different batch shapes (on a 2-core CPU, 1, 2-3 and >= 4 rows give three
different last bits, and about one pixel in 10^4 flips after rounding to uint8), so the
network always runs on `chunk` rows aligned to absolute indices, [k·chunk, (k+1)·chunk),
padded past the end of a split with the stream's next latents. Bytes are identical for the
same device kind and library versions; another device or precision may flip a few pixels, and so may
`compile` (torch.compile's kernels round differently): the manifest records whether the images were
rendered compiled, and a run that would render them otherwise is refused.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from patchscope.common import distributed
from patchscope.common.checks import (check_bool, check_choice, check_counts, check_int, check_mapping, check_text,
                                      require)
from patchscope.common.compiled import CompiledOrEager, maybe_compile
from patchscope.common.device import resolve_device
from patchscope.common.errors import DatasetError
from patchscope.common.runfolder import remove_leftovers
from patchscope.generators.base import Generator, StyleGenerator
from patchscope.generators.custom import generator_sha256, open_generator, parameters_sha256, provenance
from patchscope.generators.dataset_folder import (MANIFEST, check_same_settings, is_complete_png, plain_json,
                                                 read_manifest, remove_stale_temps, resize_lanczos, write_manifest,
                                                 write_png)
from patchscope.generators.glow.model import GlowGenerator

LOG = logging.getLogger("patchscope.sample")
# The paper's seeds: train S, test S + 1, val S + 2 (seeds 0/1/2 for its PGAN sets).
SPLIT_SEED_OFFSETS = {"train": 0, "test": 1, "val": 2}
SCALAR_TYPES = (bool, int, float, str, type(None))

Progress = Callable[[str, int, int], None]  # (split, images done so far, images to do)


# ----------------------------------------------------------------------------- latents

class LatentSource:
    """The latents (and Glow's split-level noise) of one split, handed out chunk after chunk.

    The stock `sample_latents` / `sample_split_noise` are rows of `RandomState(key).randn(n, width)`.
    The legacy generator keeps its spare Gaussian between calls, so drawing on from one
    RandomState equals their `randn(start + n, width)[start:]` without redrawing the prefix every
    chunk (quadratic in long runs). A subclass that overrides them is asked for every chunk.
    """

    def __init__(self, generator: Generator, seed: int) -> None:
        self.generator, self.seed, self.start = generator, seed, 0
        # MODULE:CALLABLE generators without a sampler of their own use the stock stream too (`stock_latents`)
        stock = type(generator).sample_latents is Generator.sample_latents or getattr(generator, "stock_latents", False)
        self.latents = np.random.RandomState(seed) if stock else None
        self.glow = isinstance(generator, GlowGenerator)
        self.shapes = generator.split_shapes if self.glow else []
        stock_noise = self.glow and type(generator).sample_split_noise is GlowGenerator.sample_split_noise
        self.noise = np.random.RandomState([seed, 1]) if stock_noise else None  # as sample_split_noise seeds it

    def take(self, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
        start, self.start = self.start, self.start + n
        if self.latents is not None:
            z = torch.from_numpy(self.latents.randn(n, self.generator.latent_dim).astype(np.float32))
        else:
            z = self.generator.sample_latents(n, self.seed, start)
        if not self.glow:
            return z, {}
        if self.noise is None:
            return z, {"split_noise": self.generator.sample_split_noise(n, self.seed, start)}
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        rows = self.noise.randn(n, sum(sizes)).astype(np.float32)
        parts = np.split(rows, np.cumsum(sizes)[:-1], axis=1)
        return z, {"split_noise": [torch.from_numpy(np.ascontiguousarray(part)).reshape(n, *shape)
                                   for part, shape in zip(parts, self.shapes)]}


# ----------------------------------------------------------------------------- generator settings

def split_seeds(seed: int, splits: list[str]) -> dict[str, int]:
    unknown = [s for s in splits if s not in SPLIT_SEED_OFFSETS]
    if unknown:
        raise DatasetError(f"unknown split(s) {unknown}; splits are {sorted(SPLIT_SEED_OFFSETS)}")
    return {s: seed + SPLIT_SEED_OFFSETS[s] for s in splits}


def resolve_options(generator: Generator, opts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Forward options made explicit: the generator's own defaults filled in, `noise_mode` const for
    style generators (random noise would make images irreproducible); unknown names refused."""
    opts = dict(opts or {})
    accepted = [name for name, p in inspect.signature(generator.forward).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "z"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise DatasetError(f"option(s) {unknown} do not apply to {type(generator).__name__} "
                           f"(accepted: {', '.join(accepted)})")
    for name, value in opts.items():
        if not isinstance(value, SCALAR_TYPES):
            raise DatasetError(f"option {name} must be a number, string or none to be recorded, "
                               f"not {type(value).__name__}")
    if isinstance(generator, StyleGenerator):
        opts.setdefault("noise_mode", "const")
    for name in ("psi", "truncation_cutoff", "temperature", "alpha"):
        if name in accepted and name not in opts and hasattr(generator, name):
            opts[name] = getattr(generator, name)
    return dict(sorted(opts.items()))


def weights_sha256(generator: Generator) -> str:
    """Digest of every parameter and buffer that shapes the images (the discriminator excluded),
    so a resumed run can tell the same weights even without the checkpoint file."""
    return parameters_sha256(generator)


@contextlib.contextmanager
def sampling_arithmetic(device: torch.device, precision: str) -> Iterator[None]:
    """fp32: true fp32 (no TF32 convs or matmuls on CUDA); bf16: autocast. On CUDA both use fixed, deterministic
    cuDNN algorithms."""
    if precision not in ("fp32", "bf16"):
        raise DatasetError(f"precision must be fp32 or bf16, not {precision!r}")
    if device.type != "cuda":
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            yield
        return
    backends = torch.backends
    flags = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark,
             backends.cudnn.deterministic)
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
    # no autotuning, and only algorithms without atomics (transposed convolutions may otherwise use them): the
    # same bits in every process and every run, so shards and resumed runs match a single run
    backends.cudnn.benchmark, backends.cudnn.deterministic = False, True
    try:
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark,
         backends.cudnn.deterministic) = flags


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Generator output N x 3 x H x W in [-1, 1] -> uint8 N x H x W x 3: clip(rint((x + 1) / 2 · 255))."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DatasetError(f"generator returned {list(images.shape)}; expected N x 3 x H x W images")
    pixels = ((images.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- sampling

@dataclass
class SampleConfig:
    generator: str = ""                 # checkpoint file (any format load_generator reads), or MODULE:CALLABLE;
    #                                     "" with an in-memory one
    weights: str = ""                   # MODULE:CALLABLE only: safetensors state dict loaded into its network
    latent_dim: int | None = None       # MODULE:CALLABLE only: for a module without a latent_dim attribute
    resolution: int | None = None       # MODULE:CALLABLE only: for a module without a resolution attribute
    out: str = ""                       # dataset folder: OUT/<split>/<index:06d>.png and OUT/manifest.json
    counts: dict[str, int] = field(default_factory=dict)  # images per split, e.g. {"train": 10000, "val": 500}
    seed: int = 0                       # train uses seed, test seed + 1, val seed + 2 (the paper's seeds 0/1/2)
    size: int | None = None             # Lanczos-resize to size x size after rounding to uint8 (None: as generated)
    opts: dict[str, Any] = field(default_factory=dict)  # forward options: psi, truncation_cutoff, noise_mode, ...
    batch_size: int = 16                # images generated per step before they are written (whole chunks)
    chunk: int = 8                      # rows per network call; fixes the arithmetic, so it is recorded
    device: str = "cpu"                 # auto | cpu | cuda | cuda:N
    precision: str = "fp32"             # fp32 (no TF32 on CUDA) | bf16 autocast; recorded, since it changes pixels
    compile: bool = False               # torch.compile the generator's forward; recorded (as it ran), as precision
    writers: int = 4                    # threads encoding PNGs

    def __post_init__(self) -> None:
        for name in ("generator", "weights", "out", "device"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        check_counts(self, "counts")
        check_int(self, "seed", 0)
        check_int(self, "size", 1, optional=True)
        check_mapping(self, "opts")
        for name in ("batch_size", "chunk", "writers"):
            check_int(self, name, 1)
        check_choice(self, "precision", ("fp32", "bf16"))
        check_bool(self, "compile")


def sample_dataset(config: SampleConfig, generator: Generator | None = None, *,
                   progress: bool | Progress = True) -> dict[str, Any]:
    """Write `config.counts[split]` images per split to `out/<split>/<index:06d>.png` and `out/manifest.json`.

    generator:  the network to sample; None loads `config.generator` (with one given, `config.generator`
                names the file it came from, recorded in the manifest, or is "" for an in-memory network)
    progress:   a progress bar, nothing, or a callable (split, done, to_do) called after every step

    Re-running into the same folder resumes: existing whole images are kept untouched, missing
    ones are made, counts may grow; other settings are refused with a DatasetError.

    Under torchrun rank r renders the chunks k with k % W == r (each chunk as one process renders it, so the
    union of the ranks' PNGs is byte-identical to one process's); rank 0 alone checks the folder and writes the
    manifest, and every rank returns once all images are written. `config.compile`: see `_renderer`.
    """
    require(config, "out")
    generator_file = config.generator or None
    if generator is None:
        require(config, "generator", "generator")
        generator = open_generator(config.generator, config.weights or None, config.latent_dim, config.resolution)
    counts, seed, size, chunk, precision = config.counts, config.seed, config.size, config.chunk, config.precision
    out = Path(config.out)
    settings = {"kind": "samples", "generator_sha256": generator_sha256(generator_file, generator) if generator_file
                else None,
                "weights_sha256": weights_sha256(generator), "generator": generator.describe(),
                "options": resolve_options(generator, config.opts), "seed": seed,
                "split_seeds": split_seeds(seed, list(counts)), "resolution": generator.resolution,
                "size": size, "chunk": chunk, "precision": precision}
    target = distributed.setup(resolve_device(config.device))
    generator.to(target).eval()
    render, settings["compile"] = _renderer(generator, config.compile, target, precision,
                                            lambda: LatentSource(generator, seed).take(chunk), settings["options"])
    manifest, done = distributed.run_on_main(_claim_and_prepare, out, settings, counts, target, generator_file,
                                             provenance(generator))
    summary: dict[str, Any] = {"out": str(out), "manifest": str(out / MANIFEST), "splits": {}}
    began = time.perf_counter()
    with ThreadPoolExecutor(config.writers) as pool, sampling_arithmetic(target, precision):
        for split, count in counts.items():
            folder = out / split
            written = _sample_split(generator, render, folder, count, done[split], manifest["split_seeds"][split],
                                    settings["options"], size, -(-config.batch_size // chunk), chunk, target, pool,
                                    _progress_for(progress, split, count - len(done[split])))
            written = sum(distributed.all_gather_object(written))  # also: every rank waits for the split
            summary["splits"][split] = {"seed": manifest["split_seeds"][split], "count": count,
                                        "existing": len(done[split]), "written": written}
    seconds = time.perf_counter() - began
    made = sum(s["written"] for s in summary["splits"].values())
    summary.update(seconds=round(seconds, 3), images_per_s=round(made / seconds, 3) if made else 0.0)
    LOG.info("sampled %d new images into %s (%.1f images/s)", made, out, summary["images_per_s"])
    return summary


def _renderer(generator: Generator, enabled: bool, device: torch.device, precision: str,
              probe: Callable[[], tuple[torch.Tensor, dict[str, Any]]],
              options: dict[str, Any]) -> tuple[Callable, bool]:
    """(what renders the images, whether it runs compiled). `enabled`: the generator's forward is compiled (an
    nn.Module's; uncompiled after one warning where the compiler cannot run or fails), and a first call on one
    chunk (`probe()`'s inputs) settles whether it runs compiled before any image is written, alike on every rank."""
    if not enabled:
        return generator, False
    render: Callable = generator
    if isinstance(generator, torch.nn.Module):
        render = maybe_compile(generator, True, device, "the generator")
    else:
        LOG.warning("--compile: %s is not a torch.nn.Module, so it runs uncompiled", type(generator).__name__)
    compiled = isinstance(render, CompiledOrEager)
    if compiled:
        z, extra = probe()
        with torch.no_grad(), sampling_arithmetic(device, precision):
            render(z.to(device), **options, **{k: [t.to(device) for t in v] for k, v in extra.items()})
        compiled = render.compiled
    if not all(distributed.all_gather_object(compiled)):  # one process renders uncompiled: every process does
        if compiled:
            LOG.warning("--compile: another process runs the generator uncompiled, so this one does too")
        return generator, False
    return render, compiled


def _claim_and_prepare(out: Path, settings: dict[str, Any], counts: dict[str, int], device: torch.device,
                       generator_file: str | os.PathLike | None,
                       source: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, set[int]]]:
    """`_claim_folder`, then each split's folder made and cleared of temporary files (before any rank writes)."""
    claimed = _claim_folder(out, settings, counts, device, generator_file, source)
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out / split)
    return claimed


def _claim_folder(out: Path, settings: dict[str, Any], counts: dict[str, int], device: torch.device,
                  generator_file: str | os.PathLike | None,
                  source: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, set[int]]]:
    """Check the folder may take this request, write the merged manifest, list the finished images."""
    recorded = read_manifest(out, settings["kind"])
    splits = sorted(set(counts) | set(recorded.get("counts", {})))
    done = {split: _finished_indices(out / split) for split in splits}
    if any(done.values()):
        check_same_settings(out, recorded, {k: v for k, v in settings.items() if k not in ("split_seeds", "compile")})
        _check_same_compile(out, recorded.get("compile", False), settings["compile"])  # older manifests: eager
        if recorded.get("device") != device.type:
            LOG.warning("%s was sampled on %s, now %s: kernels may round a few pixels differently",
                        out, recorded.get("device"), device.type)
    for split, count in counts.items():
        beyond = [i for i in done[split] if i >= count]
        if beyond:
            raise DatasetError(f"{out / split}: already holds image {max(beyond):06d}.png; ask for at least "
                               f"{max(beyond) + 1} {split} images or use a new --out folder")
    merged_counts = {**recorded.get("counts", {}), **counts}
    seeds = {**recorded.get("split_seeds", {}), **settings["split_seeds"]}
    manifest = {**plain_json(settings), "split_seeds": seeds, "counts": merged_counts,
                "latents": "numpy RandomState(split seed).randn, row i = image i",
                "pixels": "clip(rint((x + 1) / 2 * 255)) to uint8, then Pillow Lanczos to size",
                "generator_file": str(generator_file) if generator_file else recorded.get("generator_file"),
                "device": device.type, "torch": torch.__version__,
                **({"generator_source": source} if source else {})}
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    write_manifest(out, manifest)
    return manifest, {split: {i for i in done[split] if i < counts.get(split, 0)} for split in splits}


def _check_same_compile(out: Path, before: bool, now: bool) -> None:
    """Refuse to add images rendered compiled to uncompiled ones, or the reverse: their pixels may differ."""
    if before != now:
        how = {True: "compiled (torch.compile)", False: "uncompiled"}
        raise DatasetError(f"{out}: its images were rendered {how[before]} and this run would render them "
                           f"{how[now]}, which rounds differently; sample {'with' if before else 'without'} "
                           f"--compile{' where the compiler runs' if before else ''} or use a new --out folder")


def _finished_indices(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png") if is_complete_png(p)}


def _progress_for(progress: bool | Progress, split: str, to_do: int) -> Callable[[int], None]:
    """A `step(n)` that advances the bar or calls the user's callback with the running total."""
    if callable(progress):
        total = [0]

        def report(n: int) -> None:
            total[0] += n
            progress(split, total[0], to_do)
        return report
    from patchscope.common.progress import progress_bar

    bar = progress_bar(total=to_do, desc=f"sample {split}", unit="img", disable=not progress or to_do == 0,
                       leave=False)
    return bar.update


def _sample_split(generator: Generator, render: Callable, folder: Path, count: int, done: set[int], seed: int,
                  options: dict[str, Any], size: int | None, chunks_per_step: int, chunk: int,
                  device: torch.device, pool: ThreadPoolExecutor, step: Callable[[int], None]) -> int:
    source = LatentSource(generator, seed)
    pending: list[tuple[torch.Tensor, dict[str, Any], list[int], int]] = []
    written, rank, world = 0, distributed.rank(), distributed.world_size()
    for start in range(0, count, chunk):
        z, extra = source.take(chunk)  # always drawn, so the next chunk's rows stay aligned
        mine = (start // chunk) % world == rank  # torchrun: this rank's chunks
        wanted = [i for i in range(start, min(start + chunk, count)) if i not in done and mine]
        if wanted:
            pending.append((z, extra, wanted, start))
        if pending and (len(pending) == chunks_per_step or start + chunk >= count):
            written += _render_step(render, folder, pending, options, size, device, pool)
            step(sum(len(p[2]) for p in pending))
            pending = []
    return written


def _render_step(generator: Callable, folder: Path, pending: list, options: dict[str, Any],
                 size: int | None, device: torch.device, pool: ThreadPoolExecutor) -> int:
    jobs = []
    for z, extra, wanted, start in pending:
        extra = {k: [t.to(device) for t in v] for k, v in extra.items()}
        with torch.no_grad():
            pixels = to_pixels(generator(z.to(device), **options, **extra))
        jobs += [(folder / f"{i:06d}.png", pixels[i - start]) for i in wanted]
    list(pool.map(lambda job: write_png(job[0], resize_lanczos(Image.fromarray(job[1]), size)), jobs))
    return len(jobs)
