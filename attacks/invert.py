"""GAN inversion: find the latents whose generated images reproduce given images (MSE + LPIPS).

`invert` works on tensors; `invert_folder` is what `patchscope invert` runs (reprojected fakes, paper §3.2).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchscope.attacks.latent_optim import frozen, optimize_latents
from patchscope.attacks.perceptual import find_backbone_weights, load_lpips
from patchscope.common.atomic import atomic_open, write_bytes, write_json
from patchscope.common.checks import check_bool, check_choice, check_float, check_int, check_text, require
from patchscope.common.device import resolve_device
from patchscope.common.errors import InputError
from patchscope.common.images import BadImageError, read_image
from patchscope.common.progress import ProgressBar, progress_bar
from patchscope.common.runfolder import RunFolder
from patchscope.forensics.data import BAD_IMAGE_POLICIES, list_images, resize_image
from patchscope.generators.custom import generator_sha256, open_generator
from patchscope.generators.base import Generator, StyleGenerator

log = logging.getLogger("patchscope.invert")

SPACES = ("z", "w", "w+")
W_AVG_SAMPLES = 1024  # latents averaged for the start w when a generator carries no w_avg


class Inversion(NamedTuple):
    latents: torch.Tensor           # z [N, latent_dim], w [N, w_dim] or w+ [N, num_ws, w_dim]
    images: torch.Tensor            # reconstructions [N, 3, R, R], clamped to [-1, 1]
    losses: dict[str, torch.Tensor]  # per image: "loss" (optimised), "mse", and "lpips" with a model


@dataclass
class InversionObjective:
    """What "close" means: lambda_mse · MSE + lambda_lpips · LPIPS, per image."""

    lpips_model: torch.nn.Module | None = None
    lambda_mse: float = 1.0
    lambda_lpips: float = 1.0

    def __post_init__(self) -> None:
        if self.lambda_mse < 0 or self.lambda_lpips < 0:
            raise ValueError("lambda_mse and lambda_lpips must be >= 0")
        if self.lpips_model is None and self.lambda_lpips > 0:
            raise ValueError("lambda_lpips > 0 needs an LPIPS model (attacks.perceptual.load_lpips)")

    def terms(self, images: torch.Tensor, targets: torch.Tensor, report: bool = True) -> dict[str, torch.Tensor]:
        """Per-image "mse", "lpips" (when weighted, or when `report` and a model exists) and "loss"."""
        terms = {"mse": (images - targets).square().flatten(1).mean(dim=1)}
        if self.lpips_model is not None and (report or self.lambda_lpips > 0):
            terms["lpips"] = self.lpips_model(images, targets)
        terms["loss"] = self.lambda_mse * terms["mse"]
        if self.lambda_lpips > 0:
            terms["loss"] = terms["loss"] + self.lambda_lpips * terms["lpips"]
        return terms


def fit_to_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Centre-crop to a square, then resize once (antialiased bilinear) to `resolution`."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=True)


def check_space(generator: Generator, space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    if space != "z" and not isinstance(generator, StyleGenerator):
        raise ValueError(f"space {space!r} needs a style generator (mapping/synthesis); "
                         f"{type(generator).__name__} has only z")


def default_space(generator: Generator) -> str:
    """w+ for style generators (the most expressive), z for the others."""
    return "w+" if isinstance(generator, StyleGenerator) else "z"


@torch.no_grad()
def average_w(generator: StyleGenerator, seed: int = 0) -> torch.Tensor:
    """The generator's stored `w_avg`, or the mapping's mean over fixed latents when it holds none."""
    w_avg = getattr(generator, "w_avg", None)
    if w_avg is not None and bool(w_avg.abs().sum() > 0):
        return w_avg.detach().float().clone()
    log.info("generator has no w_avg: starting w at the mean mapping of %d latents", W_AVG_SAMPLES)
    device = next(generator.parameters()).device
    z = generator.sample_latents(W_AVG_SAMPLES, seed).to(device)
    return generator.mapping(z, psi=1)[:, 0].float().mean(dim=0)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each stretch of consecutive indices, in order."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def initial_latents(generator: Generator, space: str, indices: Sequence[int], seed: int,
                    w_avg: torch.Tensor | None = None) -> torch.Tensor:
    """z: rows `indices` of the generator's latent stream for `seed`; w: w_avg; w+: w_avg on every layer."""
    check_space(generator, space)
    if space == "z":
        return torch.cat([generator.sample_latents(n, seed, start) for start, n in _runs(indices)])
    w_avg = (average_w(generator) if w_avg is None else w_avg).cpu()
    if space == "w":
        return w_avg.expand(len(indices), -1).clone()
    return w_avg.expand(len(indices), generator.num_ws, -1).clone()


def make_renderer(generator: Generator, space: str, indices: Sequence[int], seed: int,
                  device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents -> images, deterministic: random noise inputs are fixed for the whole optimisation."""
    if space == "z":
        opts: dict[str, Any] = {}
        if hasattr(generator, "sample_split_noise"):  # Glow: its split levels, drawn once per image
            runs = [generator.sample_split_noise(n, seed, start) for start, n in _runs(indices)]
            opts["split_noise"] = [torch.cat(level).to(device) for level in zip(*runs)]
        return lambda z: generator(z, **opts)
    noise_mode = "const" if generator.noise_mode == "random" else None
    return lambda ws: generator.synthesis(ws, noise_mode=noise_mode)


def invert(generator: Generator, images: torch.Tensor, config: InvertConfig,
           lpips_model: torch.nn.Module | None = None, *, indices: Sequence[int] | None = None,
           progress: bool = True) -> Inversion:
    """Project images [N, 3, H, W] in [-1, 1] into `generator`'s latent space with Adam, as `config` says
    (space, steps, lr, lambda_mse, lambda_lpips, batch_size, seed, device; its paths are not read).

    Images are resized once to the generator's resolution. z of image i starts at row
    `indices[i]` (default i) of the latent stream for `seed`, w / w+ at w_avg; every image keeps its
    best latents. Images are optimised independently, so results do not depend on
    `batch_size`. `generator` and `lpips_model` are moved to the device and frozen meanwhile.
    """
    space = default_space(generator) if config.space == "auto" else config.space
    check_space(generator, space)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to invert")
    steps, batch_size, seed = config.steps, config.batch_size, config.seed
    device = resolve_device(config.device)
    objective = InversionObjective(lpips_model, config.lambda_mse, config.lambda_lpips)
    networks = [generator] + ([lpips_model] if lpips_model is not None else [])
    for net in networks:
        net.to(device)
    targets = fit_to_resolution(images.float(), generator.resolution)
    indices = list(range(len(targets)) if indices is None else indices)
    if len(indices) != len(targets):
        raise ValueError(f"{len(indices)} latent indices for {len(targets)} images")
    outputs: list[Inversion] = []
    bar = progress_bar(total=len(targets) * steps, desc=f"inverting ({space})", unit="step", leave=False,
                       disable=not progress)
    with frozen(*networks), bar:
        w_avg = None if space == "z" else average_w(generator)
        for first in range(0, len(targets), batch_size):
            batch = targets[first:first + batch_size].to(device)
            outputs.append(_invert_batch(generator, batch, space, steps, config.lr, objective, seed,
                                         indices[first:first + batch_size], w_avg, device, bar))
    return Inversion(torch.cat([o.latents for o in outputs]), torch.cat([o.images for o in outputs]),
                     {k: torch.cat([o.losses[k] for o in outputs]) for k in outputs[0].losses})


def _invert_batch(generator: Generator, targets: torch.Tensor, space: str, steps: int, lr: float,
                  objective: InversionObjective, seed: int, indices: Sequence[int], w_avg: torch.Tensor | None,
                  device: torch.device, bar: ProgressBar) -> Inversion:
    render = make_renderer(generator, space, indices, seed, device)

    def loss_fn(latents: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return objective.terms(render(latents["latent"]), targets, report=False)["loss"]

    def report(step: int, losses: torch.Tensor, latents: dict[str, torch.Tensor]) -> None:
        bar.update(len(targets))
        bar.set_postfix(loss=f"{float(losses.mean()):.4f}", refresh=False)

    init = {"latent": initial_latents(generator, space, indices, seed, w_avg)}
    result = optimize_latents(init, loss_fn, steps, lr, keep="best", callback=report, device=device)
    latent = result.latents["latent"]
    with torch.no_grad():
        images = render(latent).clamp(-1, 1)
        terms = objective.terms(images, targets)
    terms["loss"] = result.losses
    return Inversion(latent.cpu(), images.cpu(), {k: v.detach().cpu() for k, v in terms.items()})


# ----------------------------------------------------------------------------- folders

# Settings a resumed inversion may change: none of them changes a result.
RESUMABLE_CHANGES = ("out", "batch_size", "device", "on_bad_image")
RUN_FOLDER = RunFolder(holds="an inversion", resumable=RESUMABLE_CHANGES, force_to=None)


@dataclass
class InvertConfig:
    generator: str = ""                 # generator checkpoint, any format `load_generator` reads, or MODULE:CALLABLE
    weights: str = ""                   # MODULE:CALLABLE only: safetensors state dict loaded into its network
    latent_dim: int | None = None       # MODULE:CALLABLE only: for a module without a latent_dim attribute
    resolution: int | None = None       # MODULE:CALLABLE only: for a module without a resolution attribute
    images: str = ""                    # folder (or .txt/.csv manifest) of images to invert
    out: str = ""                       # reprojected PNGs, latents.pt, metrics.json, config.yaml
    split: str | None = None            # split folder when `images` has train/val/test
    space: str = "auto"                 # z | w | w+ | auto (w+ for style generators, else z)
    steps: int = 300                    # Adam steps per image
    lr: float = 0.05                    # Adam learning rate
    lambda_mse: float = 1.0             # weight of the pixel MSE
    lambda_lpips: float = 1.0           # weight of LPIPS (0: MSE only)
    lpips_net: str = "alex"             # alex | vgg | squeeze
    lpips_weights: str | None = None    # torchvision backbone file (default: the torch hub cache)
    lpips_random: bool = False          # random LPIPS backbone: smoke tests only
    batch_size: int = 8                 # images optimised together (results do not depend on it)
    seed: int = 0                       # z of image i starts at row i of this seed's latent stream
    device: str = "auto"
    on_bad_image: str = "skip"          # skip | error for unreadable images

    def __post_init__(self) -> None:
        for name in ("generator", "weights", "images", "out", "device", "lpips_net"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        check_text(self, "split", optional=True)
        check_text(self, "lpips_weights", optional=True)
        check_choice(self, "space", ("auto", *SPACES))
        check_int(self, "steps", 0)
        check_float(self, "lr", 0, low_open=True)
        check_float(self, "lambda_mse", 0)
        check_float(self, "lambda_lpips", 0)
        check_bool(self, "lpips_random")
        check_int(self, "batch_size", 1)
        check_int(self, "seed", 0)
        check_choice(self, "on_bad_image", BAD_IMAGE_POLICIES)


def output_names(paths: Sequence[Path], root: Path) -> list[str]:
    """Each image's path under `root` (its file name when elsewhere) with a .png suffix: a name
    inside the output folder whatever the manifest says."""
    names = []
    base = Path(os.path.abspath(root))
    for path in paths:
        # Lexically, `root/sub/../../X.png` is under root, and OUT/sub/../../X.png is outside OUT:
        # fold every `..` away first (abspath, links left alone), so an image outside root gets its
        # file name like any other, and no name can climb out of OUT.
        folded = Path(os.path.abspath(path))
        try:
            relative = folded.relative_to(base)
        except ValueError:
            relative = Path(folded.name)
        names.append(relative.with_suffix(".png").as_posix())
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise InputError(f"{path} and {seen[name]} would both be written as {name}; rename one")
        seen[name] = path
    return names


def read_square(path: Path, resolution: int) -> torch.Tensor:
    """An image as [3, R, R] in [-1, 1]: Lanczos shorter side to R, then the centre square."""
    pixels = resize_image(read_image(path), resolution)
    height, width = pixels.shape[:2]
    top, left = (height - resolution) // 2, (width - resolution) // 2
    pixels = np.ascontiguousarray(pixels[top:top + resolution, left:left + resolution])
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def to_png_bytes(image: torch.Tensor) -> bytes:
    """[3, R, R] in [-1, 1] -> PNG of clip(rint((x + 1) / 2 · 255)), as the paper saves samples."""
    pixels = ((image.float() + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_out(config: InvertConfig, root: Path, resume: bool) -> None:
    """Refuse an output folder that holds other results, other settings, or the images themselves."""
    out = Path(config.out)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise InputError(f"--out {out}: inside the images folder {root}; choose a folder outside it")
    RUN_FOLDER.check(out, config, resume=resume)


def _load_progress(out: Path, sha256: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    metrics_path, latents_path = out / "metrics.json", out / "latents.pt"
    if not metrics_path.is_file() or not latents_path.is_file():
        return {}, {}
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as err:
        raise InputError(f"{metrics_path}: not valid JSON ({err}); resume needs the file this command wrote") from None
    if metrics.get("generator_sha256") != sha256:
        raise InputError(f"{out}: was inverted with another generator file (SHA-256 differs); use another --out")
    latents = torch.load(latents_path, map_location="cpu", weights_only=True)
    done = {name: row for name, row in metrics.get("images", {}).items()
            if name in latents and (out / name).is_file()}
    return done, {name: latents[name] for name in done}


def _lpips_for(config: InvertConfig, device: torch.device) -> torch.nn.Module | None:
    """LPIPS when the loss needs it or its weights are at hand (then it is reported even at weight 0)."""
    wanted = config.lambda_lpips > 0 or config.lpips_random
    if not wanted and find_backbone_weights(config.lpips_net, config.lpips_weights) is None:
        return None
    return load_lpips(config.lpips_net, config.lpips_weights, device, allow_random=config.lpips_random)


def _load_batch(paths: Sequence[Path], resolution: int, policy: str,
                skipped: dict[str, str], names: Sequence[str]) -> tuple[list[int], torch.Tensor | None]:
    kept, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(read_square(path, resolution))
            kept.append(i)
        except BadImageError as err:
            if policy == "error":
                raise
            skipped[names[i]] = err.reason
            log.warning("skipping %s", err)
    return kept, torch.stack(images) if images else None


def invert_folder(config: InvertConfig, resume: bool = False) -> dict[str, Any]:
    """Invert every image under `config.images` into OUT: `<name>.png` reprojections, `latents.pt`
    ({name: latent}), `metrics.json` (per-image MSE, LPIPS, loss) and `config.yaml`.

    Results are committed batch by batch. An existing OUT is refused unless `resume`, which
    keeps its finished images and needs the same settings (`RESUMABLE_CHANGES` aside) and generator.
    """
    for name in ("generator", "images", "out"):
        require(config, name)
    out, source = Path(config.out), Path(config.images)
    paths = list_images(source, config.split)
    root = source.parent if source.is_file() else (source / config.split if config.split else source)
    names = output_names(paths, root)
    _check_out(config, root, resume)
    device = resolve_device(config.device)
    lpips_model = _lpips_for(config, device)  # before the generator: a missing file fails fast
    generator = open_generator(config.generator, config.weights or None, config.latent_dim, config.resolution)
    space = default_space(generator) if config.space == "auto" else config.space
    try:
        check_space(generator, space)
    except ValueError as err:
        raise InputError(f"--space {config.space}: {err}") from None
    sha256 = generator_sha256(config.generator, generator)
    done, latents = _load_progress(out, sha256)
    out.mkdir(parents=True, exist_ok=True)
    RUN_FOLDER.save(out, config)
    resumed = len(done)
    todo = [i for i, name in enumerate(names) if name not in done]
    skipped: dict[str, str] = {}
    for first in progress_bar(range(0, len(todo), config.batch_size), desc="invert", unit="batch"):
        batch = todo[first:first + config.batch_size]
        kept, images = _load_batch([paths[i] for i in batch], generator.resolution, config.on_bad_image,
                                   skipped, [names[i] for i in batch])
        if images is None:
            continue
        indices = [batch[k] for k in kept]
        result = invert(generator, images, dataclasses.replace(config, space=space), lpips_model, indices=indices)
        for row, index in enumerate(indices):
            name = names[index]
            write_bytes(out / name, to_png_bytes(result.images[row]))
            latents[name] = result.latents[row].clone()
            done[name] = {key: float(values[row]) for key, values in result.losses.items()}
        # latents before metrics: an image counts as finished once metrics.json lists it
        with atomic_open(out / "latents.pt", "wb") as handle:
            torch.save(latents, handle)
        write_json(out / "metrics.json", _metrics(done, skipped, space, sha256, lpips_model, names))
    summary = _metrics(done, skipped, space, sha256, lpips_model, names)
    write_json(out / "metrics.json", summary)
    return {"out": str(out), "inverted": len(done) - resumed, "resumed": resumed, "skipped": len(skipped),
            **summary["mean"]}


def _metrics(done: dict[str, dict[str, float]], skipped: dict[str, str], space: str, sha256: str,
             lpips_model: torch.nn.Module | None, names: Sequence[str]) -> dict[str, Any]:
    ordered = {name: done[name] for name in names if name in done}
    keys = sorted({key for row in ordered.values() for key in row})
    mean = {key: float(np.mean([row[key] for row in ordered.values() if key in row])) for key in keys}
    return {"space": space, "generator_sha256": sha256,
            "lpips": getattr(lpips_model, "source", None) if lpips_model is not None else None,
            "count": len(ordered), "mean": mean, "skipped": skipped, "images": ordered}
