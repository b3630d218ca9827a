"""Training a small progressive GAN (Karras et al., as pytorch_GAN_zoo does it) on a folder of images,
saved as a pytorch_GAN_zoo checkpoint. `train_gan(GANTrainConfig)` is what `patchscope train-gan` runs.

The run directory holds `config.yaml`, `metrics.jsonl`, `generator.pt` (the latest snapshot,
readable by `generators.load_generator`), `generator_{r}px.pt` at the end of each scale, and
`resume.pt` (weights, optimizer states and counters; `torch.load(weights_only=True)`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from patchscope.common import runfolder
from patchscope.common.atomic import replace_atomically
from patchscope.common.checks import check_bool, check_float, check_int, check_text, require
from patchscope.common.device import resolve_device
from patchscope.common.errors import InputError
from patchscope.common.progress import progress_bar
from patchscope.common.runfolder import RunFolder
from patchscope.generators.pgan.zoo import save_pgan_zoo
from patchscope.generators.training.growing import GrowingGAN
from patchscope.generators.training.images import TrainingImages, TrainingInputError, to_model_range
from patchscope.generators.training.schedule import batch_indices, draw_step, fade_alpha, scale_depths, scale_resolutions

log = logging.getLogger("patchscope.gan")

RESUME_FILE = "resume.pt"
GENERATOR_FILE = "generator.pt"
# Settings a resumed run may change (`out` may be spelt differently); all others must equal the saved ones.
RESUMABLE_CHANGES = {"out", "device", "snapshot_images", "log_images", "channels_last"}
RUN_FOLDER = RunFolder(holds="a GAN run", resumable=RESUMABLE_CHANGES, force_to=None)


@dataclass
class GANTrainConfig:
    """Defaults: a 32 px generator grown on ~1000 photo crops in a few minutes on a 2-core CPU."""

    images: str = ""              # folder of real PNG/JPEG images, searched recursively
    out: str = ""                 # run directory (created; an existing run is resumed or refused)
    resolution: int = 32          # final resolution, a power of two; growing starts at 4 px
    latent_dim: int = 128         # latent vector size (the zoo's celebAHQ models: 512)
    fmap_base: int = 512          # channels at r px: min(fmap_max, fmap_base // r); 64, 64, 32, 16 here
    fmap_max: int = 64            # (16384 and 512 give the zoo's celebAHQ depths)
    batch_size: int = 16          # images per step (Karras et al. and the zoo: 16)
    scale_images: int = 20_000    # real images shown at each scale (kimg budget x 1000)
    fade_images: int = 4_000      # the first this many of a new scale fade it in (alpha 1 -> 0)
    lr: float = 1e-3              # Adam learning rate, both networks
    beta1: float = 0.0            # Adam betas (Karras et al.)
    beta2: float = 0.99
    lambda_gp: float = 10.0       # WGAN-GP gradient penalty weight
    gp_every: int = 4             # penalise every this many steps with this times the weight (1: every step)
    drift: float = 0.001          # weight of D(real)^2
    ema_half_life: int = 1_000    # images over which the averaged generator's memory halves
    mirror: bool = True           # flip half the real images left-right
    seed: int = 0                 # weights, batch order and every draw derive from it
    snapshot_images: int = 10_000  # save generator.pt and resume.pt this often (and at each scale's end)
    log_images: int = 2_000       # one metrics.jsonl line per this many images
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    channels_last: bool = True    # NHWC convolutions: ~10% faster on one CPU thread, as fast on two

    def __post_init__(self) -> None:
        for name in ("images", "out", "device"):
            check_text(self, name)
        check_int(self, "resolution", 4)
        try:
            scale_resolutions(self.resolution)
        except (TypeError, ValueError) as error:
            raise InputError(f"setting resolution={self.resolution!r}: {error}") from None
        for name in ("latent_dim", "fmap_base", "fmap_max", "scale_images", "gp_every", "log_images"):
            check_int(self, name, 1)
        check_int(self, "batch_size", 2)  # minibatch stddev needs two images
        for name in ("ema_half_life", "snapshot_images", "seed"):
            check_int(self, name, 0)
        check_float(self, "lr", 0, low_open=True)
        check_float(self, "beta1", 0, 1, high_open=True)
        check_float(self, "beta2", 0, 1, high_open=True)
        check_float(self, "lambda_gp", 0)
        check_float(self, "drift", 0)
        check_bool(self, "mirror")
        check_bool(self, "channels_last")
        # A scale must end at full weight (alpha 0), so its last step lies past the fade.
        check_int(self, "fade_images", 0, (self.steps_per_scale() - 1) * self.batch_size)

    def depths(self) -> list[int]:
        return scale_depths(self.resolution, self.fmap_base, self.fmap_max)

    def steps_per_scale(self) -> int:
        return math.ceil(self.scale_images / self.batch_size)

    def ema_beta(self) -> float:
        """Per-step decay of the average: its weight of old steps halves every `ema_half_life` images."""
        return 0.5 ** (self.batch_size / self.ema_half_life) if self.ema_half_life > 0 else 0.0


@dataclass
class Progress:
    """Where a run stands: everything else about a step derives from these counters."""

    scale: int = 0         # index of the scale being trained (0: 4 px)
    step: int = 0          # steps done at this scale
    images: int = 0        # real images shown in all
    finished: bool = False
    seconds: float = 0.0   # training time so far, over every session of the run


def _prepare_run_dir(config: GANTrainConfig, resume: bool) -> Path:
    try:
        return RUN_FOLDER.claim(config.out, config, resume=resume)
    except InputError as error:  # one error type for every refusal of train-gan's inputs
        raise TrainingInputError(str(error)) from None


def _load_resume(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: name it, never execute it
        raise TrainingInputError(f"{path}: unreadable resume state ({type(error).__name__}); "
                                 f"remove it to start over") from None


def _truncate_log(path: Path, images: int) -> None:
    """Drop log lines written after the snapshot being resumed, so none is repeated."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("images", 0) <= images]
        replace_atomically(path, lambda stream: stream.write("".join(line + "\n" for line in kept).encode()))


def _append_line(path: Path, line: str) -> None:
    with open(path, "a") as stream:
        stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())


class LossMeter:
    """Sums of the step losses on the device, read (one host sync) once per log interval; a loss
    not computed on every step (the lazy gradient penalty) is averaged over the steps that have it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def take(self) -> dict[str, float]:
        means = {key: round(value.item() / self.counts[key], 6) for key, value in self.sums.items()}
        self.sums, self.counts, self.steps = {}, {}, 0
        return means

    def state_dict(self) -> dict[str, Any]:
        """The interval so far: a snapshot between two log lines must not shorten the next one's average."""
        return {"sums": {key: value.detach().cpu() for key, value in self.sums.items()},
                "counts": dict(self.counts), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {key: value.to(device) for key, value in state["sums"].items()}
        self.counts, self.steps = dict(state["counts"]), int(state["steps"])


def _crossed(images: int, step_images: int, every: int) -> bool:
    """Whether the last step (of `step_images` images) passed a multiple of `every`."""
    return every > 0 and images // every > (images - step_images) // every


def _snapshot(out: Path, gan: GrowingGAN, progress: Progress, meter: LossMeter, config: GANTrainConfig,
              end_of_scale: bool) -> None:
    """generator.pt (zoo format; avgG, netG, netD), the scale's own file at its end, then resume.pt."""
    extra = {"learningRate": config.lr, "lambdaGP": config.lambda_gp, "epsilonD": config.drift,
             "miniBatchSize": config.batch_size, "imagesSeen": progress.images,
             "imagesAtScale": progress.step * config.batch_size}
    targets = [out / GENERATOR_FILE] + ([out / f"generator_{gan.resolution}px.pt"] if end_of_scale else [])
    for target in targets:
        save_pgan_zoo(gan.average, target, net_generator=gan.generator, discriminator=gan.discriminator,
                      extra_config=extra)
    state = {"networks": gan.state_dict(), "progress": dataclasses.asdict(progress), "meter": meter.state_dict()}
    replace_atomically(out / RESUME_FILE, lambda stream: torch.save(state, stream))


def _real_batch(images: TrainingImages, config: GANTrainConfig, progress: Progress, flip: torch.Tensor,
                device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    pool = images.at(4 * 2**progress.scale)
    indices = batch_indices(len(images), config.batch_size, progress.step, config.seed, progress.scale)
    real = to_model_range(pool[indices])
    if config.mirror:
        real = torch.where(flip[:, None, None, None], real.flip(3), real)
    return real.to(device, non_blocking=True, memory_format=memory_format)


class GANTrainer:
    """A progressive GAN run: the images, the growing networks (`gan`), the counters (`progress`)
    and the run directory. `run()` trains to the end; `train_gan` is the one-call form.

    Each scale is trained for `scale_images` real images; a new scale first fades in over
    `fade_images`. Every step: one WGAN-GP critic step (lambda 10, drift 0.001; the penalty
    every `gp_every` steps at `gp_every` times the weight) and one generator step, Adam
    (lr 1e-3, betas 0, 0.99), then the averaged generator is updated.
    Snapshots every `snapshot_images` and at each scale's end; `resume=True` continues from the
    last one and ends with exactly the weights and log an uninterrupted run would have (on CPU):
    resume.pt holds all it reads, and generator*.pt written before it are rewritten identically.
    """

    def __init__(self, config: GANTrainConfig, resume: bool = False) -> None:
        require(config, "out")
        self.config = config
        self.device = resolve_device(config.device)
        self.images = TrainingImages(config.images, config.resolution)
        self.out = _prepare_run_dir(config, resume)
        self.gan = GrowingGAN(config.depths(), config.latent_dim, config.seed, lr=config.lr,
                              betas=(config.beta1, config.beta2), ema_beta=config.ema_beta(),
                              device=self.device, channels_last=config.channels_last)
        self.progress = Progress()
        self.meter = LossMeter()  # the losses since the last log line
        self.alpha = 0.0
        metrics = self.out / "metrics.jsonl"
        if resume and (self.out / RESUME_FILE).exists():
            saved = _load_resume(self.out / RESUME_FILE)
            self.gan.load_state_dict(saved["networks"])
            self.progress = Progress(**saved["progress"])
            if "meter" in saved:  # absent from the snapshots of earlier versions: their next line averages less
                self.meter.load_state_dict(saved["meter"], self.device)
            self.alpha = float(self.gan.generator.alpha)
            _truncate_log(metrics, self.progress.images)
            log.info("resuming %s at %d px after %d images", self.out, self.gan.resolution, self.progress.images)
        elif metrics.exists():
            metrics.unlink()  # a run that stopped before its first snapshot starts over
        log.info("training on %d images from %s; channels per scale %s", len(self.images),
                 self.images.folder, config.depths())

    def step(self) -> dict[str, torch.Tensor]:
        """Train one step at the current scale, growing first when the last scale is done."""
        config, progress, batch = self.config, self.progress, self.config.batch_size
        if progress.step >= config.steps_per_scale():
            self.gan.grow()
            progress.scale, progress.step = progress.scale + 1, 0
        self.alpha = fade_alpha(progress.scale, progress.step * batch, config.fade_images)
        self.gan.set_alpha(self.alpha)
        draws = draw_step(config.seed, progress.scale, progress.step, batch, config.latent_dim)
        real = _real_batch(self.images, config, progress, draws.flip, self.device, self.gan.memory_format)
        # Lazy regularisation: the penalty every `gp_every` steps, weighted by it, has the same mean.
        lambda_gp = config.lambda_gp * config.gp_every if progress.step % config.gp_every == 0 else 0.0
        losses = self.gan.train_step(real, draws.z_critic.to(self.device), draws.z_generator.to(self.device),
                                     draws.mix.to(self.device), lambda_gp, config.drift)
        progress.step += 1
        progress.images += batch
        progress.finished = progress.step == config.steps_per_scale() and progress.scale == len(config.depths()) - 1
        return losses

    def run(self, on_snapshot: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train until the last scale is done; `on_snapshot(progress)` follows every snapshot."""
        config, progress, batch = self.config, self.progress, self.config.batch_size
        steps = config.steps_per_scale()
        meter = self.meter
        earlier = progress.seconds  # training time of the sessions before a resume
        started = interval_start = time.perf_counter()
        with progress_bar(total=steps * batch * len(config.depths()), initial=progress.images, unit="img",
                          desc="train-gan", dynamic_ncols=True) as bar:
            while not progress.finished:
                meter.add(self.step())
                bar.update(batch)
                now = time.perf_counter()
                progress.seconds = round(earlier + now - started, 3)
                end_of_scale = progress.step == steps
                if end_of_scale or _crossed(progress.images, batch, config.log_images):
                    interval_images = meter.steps * batch
                    record = {"images": progress.images, "kimg": round(progress.images / 1000, 3),
                              "resolution": self.gan.resolution, "alpha": round(self.alpha, 6), **meter.take(),
                              "seconds": progress.seconds,
                              "images_per_s": round(interval_images / max(now - interval_start, 1e-9), 2)}
                    interval_start = now
                    _append_line(self.out / "metrics.jsonl", json.dumps(record))
                    bar.set_postfix(res=self.gan.resolution, alpha=f"{self.alpha:.2f}",
                                    w_dist=f"{record['wasserstein']:.3f}")
                if end_of_scale or _crossed(progress.images, batch, config.snapshot_images):
                    _snapshot(self.out, self.gan, progress, meter, config, end_of_scale)
                    if on_snapshot is not None:
                        on_snapshot(dataclasses.asdict(progress))
        return {"run": str(self.out), "generator": str(self.out / GENERATOR_FILE),
                "resolution": self.gan.resolution, "images": progress.images, "finished": progress.finished,
                "seconds": progress.seconds}


def train_gan(config: GANTrainConfig, resume: bool = False,
              on_snapshot: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Grow a PGAN from 4 px to `config.resolution` and save it (see `GANTrainer`); returns a
    summary: run directory, generator path, resolution, images shown, seconds."""
    trainer = GANTrainer(config, resume)
    try:
        return trainer.run(on_snapshot)
    finally:
        runfolder.release(trainer.out)  # the run folder is free for another process
