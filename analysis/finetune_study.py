"""The finetuning study: `run_finetune` finetunes a generator against a frozen classifier (attacks.finetune),
then shows original vs finetuned samples of the same latents and tabulates the classifier before and after.
Used by the CLI (`patchscope finetune`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from patchscope.analysis.grids import image_grid, save_image, to_uint8
from patchscope.analysis.shift_grid import LARGEST_TILE
from patchscope.attacks.finetune import FinetuneSettings, GeneratorFinetuner
from patchscope.attacks.finetune_eval import FINETUNED, ORIGINAL, Comparison
from patchscope.attacks.finetune_anchor import ANCHORS
from patchscope.attacks.finetune_files import (GENERATOR_FILES, MANIFEST_FILE, METRICS_FILE, RESUME_FILE,
                                              STAGING_FOLDER, committed, forget)
from patchscope.attacks.gan_objectives import objective_for
from patchscope.attacks.perceptual import LPIPS_NETS, find_backbone_weights, load_lpips
from patchscope.attacks.real_batches import RealImages
from patchscope.attacks.shift import ClassifierInput
from patchscope.common import config as configs
from patchscope.common import distributed
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import check_bool, check_choice, check_float, check_int, check_text, require
from patchscope.common.device import PRECISIONS, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.runfolder import RECORD, RunFolder
from patchscope.forensics.checkpoint import CHECKPOINT_CHOICES, load_classifier, resolve_checkpoint
from patchscope.forensics.data import BAD_IMAGE_POLICIES
from patchscope.forensics.scoring import AGGREGATIONS
from patchscope.generators import checkpoint_sha256
from patchscope.generators.base import Generator
from patchscope.generators.custom import generator_sha256, module_source, open_generator, provenance
from patchscope.generators.io.writers import check_writable

log = logging.getLogger("patchscope.finetune")

TABLE_FIELDS = ("generator", "n", "n_real", "n_fake", "acc", "acc_real", "acc_fake", "ap", "ap_real", "roc_auc",
                "p_fake", "lpips_to_original")
# Settings a resumed study may change: they decide how long it trains, how often it saves, and what
# it shows at the end, not what any step computes.
RESUMABLE_CHANGES = ("out", "steps", "device", "checkpoint_every", "compare_n", "grid_rows", "cache_real")
GRID_TITLE = "original vs finetuned ({steps} steps), same latents; caption = P(fake)"
SOURCES_FILE = "sources.json"  # SHA-256 of the generator and classifier files the run started from
RESULT_FILES = (MANIFEST_FILE, STAGING_FOLDER, *GENERATOR_FILES, RESUME_FILE, METRICS_FILE, SOURCES_FILE,
                "before_after.json", "before_after.csv", "grid.png")
RUN_FOLDER = RunFolder(holds="a finetuning run", resumable=RESUMABLE_CHANGES, writes=RESULT_FILES)


@dataclass
class FinetuneConfig:
    generator: str = ""                 # PGAN (zoo, TF), StyleGAN (TF), StyleGAN2 checkpoint, or MODULE:CALLABLE
    weights: str = ""                   # MODULE:CALLABLE only: safetensors state dict loaded into its network
    latent_dim: int | None = None       # MODULE:CALLABLE only: for a module without a latent_dim attribute
    resolution: int | None = None       # MODULE:CALLABLE only: for a module without a resolution attribute
    classifier: str = ""                # frozen classifier: run directory or .safetensors file
    real: str = ""                      # real images: folder, split folder (see real_split) or manifest
    out: str = ""                       # generator.pt (.safetensors), resume.pt, metrics.jsonl, grid.png, before_after.*, config.yaml
    which: str = "best"                 # best | last checkpoint of a classifier run directory
    real_split: str | None = None       # split folder of `real` (None: train/ when it has one)
    steps: int = 1000                   # finetuning steps (one D and one G update each, see n_critic)
    batch_size: int = 8                 # fakes and reals per step
    classifier_weight: float = 1.0      # weight of L_real(G, C) beside the GAN loss
    lr: float | None = None             # Adam lr of G and D (None: 1e-3 for PGAN, 2e-3 for StyleGAN2)
    beta1: float = 0.0                  # Adam betas (Karras et al.; StyleGAN2 alike)
    beta2: float = 0.99
    n_critic: int = 1                   # discriminator updates per generator update
    ema_beta: float | None = None       # moving average of the generator, what is saved and shown (None: its
    #                                     half-life is 10% of the steps: 0.5 ** (1 / (0.1 steps)) within [0.9, 0.999])
    anchor: str = "lpips"               # no discriminator: lpips | l2 | lpips+l2 between G(z) and the original's G0(z)
    anchor_weight: float = 1.0          # weight of that anchor beside the classifier loss
    lambda_gp: float = 10.0             # PGAN: WGAN-GP gradient penalty weight
    drift: float = 0.001                # PGAN: weight of D(real)^2
    r1_gamma: float = 10.0              # StyleGAN2: R1 weight γ
    r1_every: int = 1                   # StyleGAN2: R1 every k-th D step (lazy regularisation when > 1)
    mirror: bool = True                 # flip half the real images left-right
    max_loss: float = 1e4               # divergence guard: a D or G loss above this stops the run
    seed: int = 0                       # every draw of step s derives from (seed, s)
    checkpoint_every: int = 100         # save generator.pt and resume.pt this often (and at the end)
    log_every: int = 50                 # one metrics.jsonl line (losses + classifier on fresh samples)
    eval_n: int = 64                    # samples and reals judged per log line
    eval_seed: int | None = None        # held-out latents for the log, table and grid (None: seed + 1)
    compare_n: int = 256                # samples per generator in before_after
    grid_rows: int = 6                  # latents shown in grid.png; 0 = no grid
    aggregation: str = "after_softmax"  # image P(fake): after_softmax | before_softmax | vote
    load_size: int | None = None        # classifier input: None = as the classifier was trained
    crop_size: int | None = None
    lpips_net: str = "alex"             # LPIPS drift from the original: alex | vgg | squeeze
    lpips_weights: str | None = None    # torchvision backbone file (default: the torch hub cache)
    lpips_random: bool = False          # random LPIPS backbone: smoke tests only
    cache_real: bool | None = None      # keep decoded reals in memory (None: when they fit in 4 GiB)
    on_bad_image: str = "skip"          # skip | error
    device: str = "auto"
    precision: str = "auto"             # auto (bf16 on CUDA and CPUs with native bf16) | fp32 | bf16
    compile: bool = False               # torch.compile the classifier and the generator's forward (never D)

    def __post_init__(self) -> None:
        for name in ("generator", "weights", "classifier", "real", "out", "device"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        check_text(self, "real_split", optional=True)
        check_choice(self, "which", CHECKPOINT_CHOICES)
        check_int(self, "steps", 0)
        check_int(self, "batch_size", 2)
        check_float(self, "lr", 0, low_open=True, optional=True)
        check_float(self, "beta1", 0, 1, high_open=True)
        check_float(self, "beta2", 0, 1, high_open=True)
        check_float(self, "ema_beta", 0, 1, high_open=True, optional=True)
        check_choice(self, "anchor", ANCHORS)
        for name in ("classifier_weight", "lambda_gp", "drift", "r1_gamma", "anchor_weight"):
            check_float(self, name, 0)
        check_float(self, "max_loss", 0, low_open=True)
        for name in ("n_critic", "r1_every", "eval_n", "compare_n"):
            check_int(self, name, 1)
        for name in ("seed", "checkpoint_every", "log_every", "grid_rows"):
            check_int(self, name, 0)
        check_int(self, "eval_seed", 0, optional=True)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_int(self, "load_size", 1, optional=True)
        check_int(self, "crop_size", 1, optional=True)
        check_choice(self, "lpips_net", LPIPS_NETS)
        check_text(self, "lpips_weights", optional=True)
        for name in ("lpips_random", "mirror", "compile"):
            check_bool(self, name)
        check_bool(self, "cache_real", optional=True)
        check_choice(self, "on_bad_image", BAD_IMAGE_POLICIES)
        check_choice(self, "precision", PRECISIONS)


# ----------------------------------------------------------------------------- the grid

def finetune_grid_content(comparison: Comparison, steps: int) -> dict[str, Any]:
    """The `image_grid` arguments: a row per latent, columns original | finetuned (the original framed),
    every tile captioned with the classifier's P(fake)."""
    if not comparison.images:
        raise ValueError("the comparison kept no images (compare(..., keep_images=n))")
    names = (ORIGINAL, FINETUNED)
    rows = len(comparison.images[ORIGINAL])
    return {"images": [[to_uint8(comparison.images[name][i]) for name in names] for i in range(rows)],
            "captions": [[f"P(fake) {float(comparison.p_fake[name][i]):.3f}" for name in names] for i in range(rows)],
            "col_labels": ["original", "finetuned"],
            "row_labels": [f"seed {comparison.seed}\n#{i}" for i in range(rows)],
            "title": GRID_TITLE.format(steps=steps),
            "highlight_col": 0}


def render_finetune_grid(comparison: Comparison, steps: int, tile_size: int | None = None) -> Image.Image:
    content = finetune_grid_content(comparison, steps)
    side = comparison.images[ORIGINAL].shape[-1]
    return image_grid(**content, tile_size=tile_size or (LARGEST_TILE if side > LARGEST_TILE else None))


# ----------------------------------------------------------------------------- the study

def _check_out(config: FinetuneConfig, resume: bool, force: bool) -> None:
    RUN_FOLDER.check(config.out, config, resume=resume, force=force)


def _with_saved_ema(config: FinetuneConfig, resume: bool) -> FinetuneConfig:
    """A run recorded before `ema_beta` defaulted to the step rule (0.999 then) resumes with its own value."""
    record = Path(config.out) / RECORD
    if not resume or config.ema_beta is not None or not record.is_file():
        return config
    saved = configs.read_yaml(record).get("ema_beta")
    return replace(config, ema_beta=saved) if isinstance(saved, float) else config


def _lpips_for(config: FinetuneConfig, device: torch.device) -> nn.Module | None:
    """LPIPS when its backbone weights are at hand (or a random one is asked for); else drift is not reported."""
    if not config.lpips_random and find_backbone_weights(config.lpips_net, config.lpips_weights) is None:
        log.warning("no LPIPS %s backbone weights found; LPIPS drift from the original is not reported",
                    config.lpips_net)
        return None
    return load_lpips(config.lpips_net, config.lpips_weights, device, allow_random=config.lpips_random)


def _load_generator(config: FinetuneConfig) -> Generator:
    generator = open_generator(config.generator, config.weights or None, config.latent_dim, config.resolution)
    try:
        check_writable(generator)
    except InputError as err:
        raise InputError(f"{config.generator}: {err}") from None
    return generator


def _real_split(config: FinetuneConfig) -> str | None:
    if config.real_split is not None:
        return config.real_split
    return "train" if (Path(config.real) / "train").is_dir() else None


def _trained(out: Path) -> bool:
    """Whether OUT holds a saved checkpoint (then the source files it was finetuned from matter)."""
    return committed(out) or (out / RESUME_FILE).exists()


def _check_sources(out: Path, sources: dict[str, str]) -> None:
    """A resumed run must start from the very files it started from (same SHA-256), not just the same paths.

    Until a checkpoint is saved nothing depends on them (`_record_sources` then writes them again)."""
    saved_file = out / SOURCES_FILE
    if not _trained(out):
        return
    if not saved_file.is_file():
        raise InputError(f"{out}: holds a finetuning checkpoint but no {SOURCES_FILE} to tell which generator and "
                         f"classifier files it was finetuned from; pass --force to start again or use another --out")
    saved = json.loads(saved_file.read_text())
    for key, digest in sources.items():
        if saved.get(key) != digest:
            raise InputError(f"{out}: was finetuned from another {key.split('_')[0]} file (SHA-256 differs); "
                             f"pass --force to start again or use another --out")


def _record_sources(out: Path, sources: dict[str, str]) -> None:
    """Write sources.json, after config.yaml: a run killed between the two, before its first checkpoint, is a run
    that --resume continues (its sources are written then)."""
    if not _trained(out):
        write_json(out / SOURCES_FILE, sources)


def _write_table(out: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    before, after = rows
    change = {k: after[k] - before[k] for k in ("acc", "acc_fake", "ap", "p_fake")
              if not (math.isnan(after[k]) or math.isnan(before[k]))}
    write_json(out / "before_after.json", {**info, "rows": rows, "change": change})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f for f in TABLE_FIELDS if f in rows[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows)
    write_text(out / "before_after.csv", buffer.getvalue())


def run_finetune(config: FinetuneConfig, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Finetune the generator against the frozen classifier (eq. 4), then compare it with the original.

    OUT receives config.yaml, metrics.jsonl, generator.pt (the source's format: pytorch_GAN_zoo for PGAN,
    rosinality for StyleGAN2; `load_generator` reads it; for MODULE:CALLABLE generator.safetensors, its state
    dict for --weights) and resume.pt, then before_after.json/.csv (the
    classifier's accuracy, acc_fake, AP and mean P(fake) on original vs finetuned samples of the same
    held-out latents against the same reals, LPIPS between them) and grid.png. An existing OUT is
    refused unless `resume` (continues from resume.pt; a finished run is only re-scored, more steps
    continue it) or `force` (starts again).

    Under torchrun every rank trains on its slice of each global batch (`attacks.finetune_ddp`: `batch_size` is
    the global batch, a multiple of the number of processes); rank 0 alone checks and writes OUT and runs the
    evaluation (the in-run log lines, before_after and the grid), its refusals reaching every rank.
    """
    with distributed.alike():
        for name in ("generator", "classifier", "real", "out"):
            require(config, name)
        distributed.check_global_batch(config.batch_size)
        device = distributed.setup(resolve_device(config.device))
    config = _with_saved_ema(config, resume)
    distributed.run_on_main(_check_out, config, resume, force)
    out = Path(config.out)
    eval_seed = config.seed + 1 if config.eval_seed is None else config.eval_seed
    with distributed.alike():
        finetuner, sources, lpips_model, classifier_file, generator = _open_finetuner(config, device)
    distributed.run_on_main(_prepare_out, out, config, sources, force)
    result = finetuner.run(config.steps, config.batch_size, config.seed, out=out,
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                           eval_n=config.eval_n, eval_seed=eval_seed, resume=resume)
    summary = {"out": str(out), "generator": str(result.checkpoint) if result.checkpoint else None,
               "format": result.settings["format"], "steps": result.steps, "stopped": result.stopped,
               "eval_seed": eval_seed, "rows": [], "grid": None}
    if result.stopped and distributed.is_main():
        log.warning("finetuning stopped: %s; kept the checkpoint of step %d", result.stopped, result.steps)
    if result.checkpoint is None:
        return summary  # diverged before its first checkpoint: nothing finetuned to compare
    info = {"steps": result.steps, "stopped": result.stopped, "eval_seed": eval_seed,
            "aggregation": config.aggregation, "classifier": str(classifier_file),
            "generator": str(config.generator), **sources, "finetuned_sha256": checkpoint_sha256(result.checkpoint),
            **({"generator_source": provenance(generator)} if module_source(generator) else {}),
            "lpips": None if lpips_model is None else f"{config.lpips_net}: {lpips_model.source}",
            "settings": result.settings}
    # the comparison is rank 0's alone; the other ranks wait for its rows
    rows, grid = distributed.run_on_main(_compare_and_write, finetuner, config, out, info, eval_seed)
    return {**summary, "rows": rows, "grid": grid}


def _open_finetuner(config: FinetuneConfig, device: torch.device) -> tuple[GeneratorFinetuner, dict[str, str],
                                                                          nn.Module | None, Path, Generator]:
    """The classifier, LPIPS, generator and real images loaded, the finetuner configured, the source digests."""
    precision = resolve_precision(config.precision, device)
    configure_backends(device)
    classifier_file = resolve_checkpoint(config.classifier, config.which)
    classifier, classifier_meta = load_classifier(classifier_file, device=device)
    lpips_model = _lpips_for(config, device)
    generator = _load_generator(config)
    real = RealImages.from_source(config.real, generator.resolution, _real_split(config), config.on_bad_image,
                                  config.cache_real)
    trained = ClassifierInput.from_meta(classifier_meta)
    view = ClassifierInput(config.load_size or trained.load_size, config.crop_size or trained.crop_size)
    objective = None if generator.discriminator is None else objective_for(
        generator.discriminator, lambda_gp=config.lambda_gp, drift=config.drift, r1_gamma=config.r1_gamma,
        r1_every=config.r1_every, generic=module_source(generator) is not None)
    settings = FinetuneSettings(classifier_weight=config.classifier_weight, lr=config.lr,
                                betas=(config.beta1, config.beta2), n_critic=config.n_critic, ema_beta=config.ema_beta,
                                mirror=config.mirror, max_loss=config.max_loss, aggregation=config.aggregation,
                                precision=precision, anchor=config.anchor, anchor_weight=config.anchor_weight)
    finetuner = GeneratorFinetuner(generator, classifier, real, settings, objective=objective, classifier_input=view,
                                   lpips=lpips_model, device=device, compile=config.compile)
    sources = {"generator_sha256": generator_sha256(config.generator, generator),
               "classifier_sha256": checkpoint_sha256(classifier_file)}
    return finetuner, sources, lpips_model, classifier_file, generator


def _prepare_out(out: Path, config: FinetuneConfig, sources: dict[str, str], force: bool) -> None:
    """Rank 0, before training: OUT made (cleared with `force`), its sources checked, config.yaml written."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        forget(out)  # the commit first: from then on nothing of the older run counts
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
    _check_sources(out, sources)
    RUN_FOLDER.save(out, config)
    _record_sources(out, sources)


def _compare_and_write(finetuner: GeneratorFinetuner, config: FinetuneConfig, out: Path, info: dict[str, Any],
                       eval_seed: int) -> tuple[list[dict[str, Any]], str | None]:
    """Rank 0, after training: the original and the finetuned generator compared; before_after.* and grid.png."""
    comparison = finetuner.compare(config.compare_n, eval_seed, keep_images=config.grid_rows, real_seed=config.seed)
    rows = comparison.rows()
    head = {k: info[k] for k in ("steps", "stopped", "eval_seed")}
    _write_table(out, rows, {**head, "n_real": len(comparison.p_fake_real), **info})
    grid = out / "grid.png"
    if config.grid_rows:
        save_image(grid, render_finetune_grid(comparison, info["steps"]))
    else:
        grid.unlink(missing_ok=True)
    return rows, str(grid) if config.grid_rows else None
