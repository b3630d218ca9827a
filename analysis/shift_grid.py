"""The exaggeration study: rows of samples G(z − k·w) captioned with P(fake), and `run_exaggerate`,
which fits the shift (attacks.shift), scores it on held-out latents and writes its files. Used by the CLI.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from patchscope.analysis.grids import image_grid, save_image, to_uint8
from patchscope.attacks.perceptual import LPIPS_NETS, find_backbone_weights, load_lpips
from patchscope.attacks.shift import (DEFAULT_KS, SIGN_CONVENTION, SPACES, ClassifierInput, ShiftExaggeration,
                                     ShiftSweep, check_held_out, load_shift, resolve_space, save_shift)
from patchscope.common import distributed
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import (check_bool, check_choice, check_float, check_int, check_numbers, check_text,
                                      require)
from patchscope.common.device import PRECISIONS, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.runfolder import RunFolder
from patchscope.forensics.checkpoint import CHECKPOINT_CHOICES, load_classifier, resolve_checkpoint
from patchscope.forensics.evaluate import warn_size_mismatch
from patchscope.forensics.scoring import AGGREGATIONS
from patchscope.generators import checkpoint_sha256
from patchscope.generators.custom import generator_sha256, open_generator, provenance
from patchscope.generators.base import Generator

log = logging.getLogger("patchscope.exaggerate")

LARGEST_TILE = 256  # px; larger generator outputs are shown downsized so a grid stays a few MB
METRIC_FIELDS = ("k", "n", "p_fake", "p_fake_std", "logit", "logit_std", "lpips", "lpips_std")
LOGIT_MEANING = ("mean over the samples of log(p / (1 - p)), p the image P(fake) of the aggregation, "
                 "p clamped to [2^-24, 1 - 2^-24] (float32 precision: |logit| <= 16.6)")
SATURATED = 0.01  # k = 0 mean P(fake) above 1 - this or below it: warn that P(fake) hardly moves
# Settings a resumed study may change: they only decide how the fitted shift is scored and shown.
# What shift.json records about the fit; a reused shift must agree on all of it. `compile`: whether networks ran
# torch.compiled (it changes float rounding), compared like `precision`; shift.json files older than it ran eager.
FIT_KEYS = ("space", "load_size", "crop_size", "lam", "steps", "batch_size", "lr", "seed", "precision", "compile",
            "lpips")
FIT_DEFAULTS = {"compile": False}  # the value of a key a shift.json written before it was added lacks
RESUMABLE_CHANGES = ("out", "ks", "eval_n", "eval_seed", "eval_batch_size", "grid_rows", "aggregation", "device")
RUN_FOLDER = RunFolder(holds="an exaggeration", resumable=RESUMABLE_CHANGES, resume_to="re-score its shift",
                       force_to="fit it again",
                       writes=("metrics.jsonl", "shift.pt", "shift.json", "metrics.json", "metrics.csv", "grid.png"))


# ----------------------------------------------------------------------------- the grid

def _k_label(k: float) -> str:
    return "k=0 original" if k == 0 else f"k={k:+g}"


def grid_title(space: str) -> str:
    # ASCII minus: Pillow's default font has no glyph for U+2212
    moved = "G(z - k·w)" if space == "z" else "synthesis(mapping(z) - k·w)"
    return f"{moved}, w = learned {space}-space shift: k > 0 more fake, k < 0 less fake; caption = P(fake)"


def shift_grid_content(sweep: ShiftSweep, space: str, seed: int) -> dict[str, Any]:
    """The `image_grid` arguments for a sweep of latents 0..n-1 of `seed` that kept its images:
    a row per sample, a column per k, the k = 0 column (the original) highlighted."""
    if sweep.images is None:
        raise ValueError("the sweep kept no images (ShiftExaggeration.sweep(..., keep_images=True))")
    n, cols = sweep.p_fake.shape
    zero = [j for j, k in enumerate(sweep.ks) if k == 0]
    return {"images": [[to_uint8(sweep.images[i, j]) for j in range(cols)] for i in range(n)],
            "captions": [[f"P(fake) {float(sweep.p_fake[i, j]):.3f}" for j in range(cols)] for i in range(n)],
            "col_labels": [_k_label(k) for k in sweep.ks],
            "row_labels": [f"seed {seed}\n#{i}" for i in range(n)],
            "title": grid_title(space), "highlight_col": zero[0] if zero else None}


def render_shift_grid(sweep: ShiftSweep, space: str, seed: int, tile_size: int | None = None) -> Image.Image:
    """The grid of a sweep; images larger than LARGEST_TILE px are shown at that size."""
    content = shift_grid_content(sweep, space, seed)
    side = sweep.images.shape[-1]
    return image_grid(**content, tile_size=tile_size or (LARGEST_TILE if side > LARGEST_TILE else None))


def shift_grid(generator: Generator, classifier: nn.Module, shift: torch.Tensor,
               ks: Sequence[float] = DEFAULT_KS, n_rows: int = 4, seed: int = 1, *,
               tile_size: int | None = None, **options: Any) -> Image.Image:
    """Rows of samples G(z − k·w) for latents 0..n_rows-1 of `seed`, columns k in `ks`; k = 0 (the
    original) framed, every tile captioned with the classifier's P(fake). `options` go to
    `ShiftExaggeration` (space, classifier_input, aggregation, device, precision)."""
    attack = ShiftExaggeration(generator, classifier, None, lam=0.0, **options)
    sweep = attack.sweep(shift, ks, n_rows, seed, batch=n_rows, keep_images=True)
    return render_shift_grid(sweep, attack.space, seed, tile_size)


# ----------------------------------------------------------------------------- the study

@dataclass
class ExaggerateConfig:
    generator: str = ""                 # generator checkpoint, any format `load_generator` reads, or MODULE:CALLABLE
    weights: str = ""                   # MODULE:CALLABLE only: safetensors state dict loaded into its network
    latent_dim: int | None = None       # MODULE:CALLABLE only: for a module without a latent_dim attribute
    resolution: int | None = None       # MODULE:CALLABLE only: for a module without a resolution attribute
    classifier: str = ""                # classifier run directory or .safetensors file
    out: str = ""                       # shift.pt/.json, metrics.json/.csv/.jsonl, grid.png, config.yaml
    which: str = "best"                 # best | last checkpoint of a run directory
    space: str = "auto"                 # z | w | auto (w for StyleGAN/StyleGAN2, else z)
    lam: float = 1.0                    # λ of eq. 3: weight of LPIPS(G(z), G(z − w))
    steps: int = 500                    # Adam steps, each on a fresh latent batch
    batch_size: int = 16                # latents per step
    lr: float = 0.01                    # Adam learning rate
    seed: int = 0                       # training batches come from seeds derived from (seed, step)
    eval_seed: int | None = None        # held-out latents for metrics and the grid (None: seed + 1)
    eval_n: int = 256                   # held-out latents scored per k
    eval_batch_size: int = 16
    ks: list[float] = field(default_factory=lambda: list(DEFAULT_KS))  # columns G(z − k·w)
    grid_rows: int = 6                  # samples shown in grid.png
    aggregation: str = "after_softmax"  # image P(fake) reported: after_softmax | before_softmax | vote
    load_size: int | None = None        # classifier input: None = as the classifier was trained
    crop_size: int | None = None
    lpips_net: str = "alex"             # alex | vgg | squeeze
    lpips_weights: str | None = None    # torchvision backbone file (default: the torch hub cache)
    lpips_random: bool = False          # random LPIPS backbone: smoke tests only
    device: str = "auto"
    precision: str = "auto"             # auto (bf16 on CUDA and CPUs with native bf16) | fp32 | bf16
    compile: bool = False               # torch.compile classifier, generator and LPIPS (eager where it cannot run)

    def __post_init__(self) -> None:
        for name in ("generator", "weights", "classifier", "out", "device"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        check_choice(self, "which", CHECKPOINT_CHOICES)
        check_choice(self, "space", ("auto", *SPACES))
        check_float(self, "lam", 0)
        check_int(self, "steps", 0)
        check_float(self, "lr", 0, low_open=True)
        for name in ("batch_size", "eval_n", "eval_batch_size"):
            check_int(self, name, 1)
        check_int(self, "seed", 0)
        check_int(self, "eval_seed", 0, optional=True)
        check_numbers(self, "ks")
        check_int(self, "grid_rows", 0)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_int(self, "load_size", 1, optional=True)
        check_int(self, "crop_size", 1, optional=True)
        check_choice(self, "lpips_net", LPIPS_NETS)
        check_text(self, "lpips_weights", optional=True)
        for name in ("lpips_random", "compile"):
            check_bool(self, name)
        check_choice(self, "precision", PRECISIONS)


def parse_ks(text: str) -> list[float]:
    """`"-2,-1,0,1,2"` -> [-2.0, -1.0, 0.0, 1.0, 2.0]: the columns G(z − k·w) of `--ks`."""
    try:
        ks = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--ks {text!r}: expected numbers separated by commas, e.g. -2,-1,0,1,2") from None
    if not ks:
        raise InputError(f"--ks {text!r}: expected at least one k, e.g. -2,-1,0,1,2")
    return ks


def _eval_seed(config: ExaggerateConfig) -> int:
    seed = config.seed + 1 if config.eval_seed is None else config.eval_seed
    try:
        check_held_out(config.seed, config.steps, seed)
    except ValueError as err:
        raise InputError(f"--eval-seed: {err}") from None
    return seed


def _check_out(config: ExaggerateConfig, resume: bool, force: bool) -> None:
    RUN_FOLDER.check(config.out, config, resume=resume, force=force)


def _lpips_for(config: ExaggerateConfig, device: torch.device) -> nn.Module | None:
    """LPIPS when λ > 0 or its weights are at hand (then it is reported even at λ = 0)."""
    wanted = config.lam > 0 or config.lpips_random
    if not wanted and find_backbone_weights(config.lpips_net, config.lpips_weights) is None:
        return None
    return load_lpips(config.lpips_net, config.lpips_weights, device, allow_random=config.lpips_random)


def _prepare_out(config: ExaggerateConfig, meta: dict[str, Any], dim: int,
                 force: bool) -> tuple[torch.Tensor | None, Any]:
    """Rank 0's part before the fit: the shift (and its `final` terms) of a finished earlier fit to reuse, or
    (None, None); config.yaml written; the shift.json of an unfinished fit removed."""
    out = Path(config.out)
    shift = None if force else _fitted_shift(out, meta, dim)
    out.mkdir(parents=True, exist_ok=True)
    RUN_FOLDER.save(out, config)
    if shift is None:
        (out / "shift.json").unlink(missing_ok=True)  # until the new fit is saved, no fit counts as finished
        return None, None
    return shift, load_shift(out)[1].get("final")


def _write_fit(out: Path, history: list[dict[str, float]], shift: torch.Tensor, meta: dict[str, Any]) -> None:
    log_lines = [json.dumps({"step": step, **record}) for step, record in enumerate(history)]
    write_text(out / "metrics.jsonl", "".join(line + "\n" for line in log_lines))
    save_shift(out, shift, meta)  # shift.json last: it marks the fit as finished


def _write_scores(out: Path, rows: list[dict[str, float]], info: dict[str, Any], shift: torch.Tensor,
                  meta: dict[str, Any]) -> None:
    _write_metrics(out, rows, info)
    save_shift(out, shift, {**meta, **info, "k_metrics": rows})


def _fitted_shift(out: Path, meta: dict[str, Any], dim: int) -> torch.Tensor | None:
    """The shift a finished earlier fit with these very settings left in OUT, or None."""
    if not (out / "shift.json").is_file():
        return None
    shift, saved = load_shift(out)
    for key in ("generator_sha256", "classifier_sha256"):
        if saved.get(key) != meta[key]:
            raise InputError(f"{out}: was fitted with another {key.split('_')[0]} file (SHA-256 differs); "
                             f"pass --force to refit or use another --out")
    differing = [key for key in FIT_KEYS if saved.get(key, FIT_DEFAULTS.get(key)) != meta[key]]
    if differing or shift.numel() != dim:
        raise InputError(f"{out}/shift.json: fitted with other {', '.join(differing) or 'dimensions'} than "
                         f"asked; pass --force to refit or use another --out")
    return shift


def rows_with_logits(sweep: ShiftSweep) -> list[dict[str, float]]:
    """`sweep.rows()` with the mean and std of each sample's log-odds of P(fake) (LOGIT_MEANING) after
    P(fake)'s: they still spread out where a saturated classifier's P(fake) is pinned near 0 or 1."""
    tiny = 2.0 ** -24
    rows = []
    for j, row in enumerate(sweep.rows()):
        p = sweep.p_fake[:, j].double().clamp(tiny, 1 - tiny)
        logit = torch.log(p) - torch.log1p(-p)
        head = {key: row[key] for key in ("k", "n", "p_fake", "p_fake_std")}
        rows.append({**head, "logit": float(logit.mean()), "logit_std": float(logit.std()), **row})
    return rows


def warn_if_saturated(rows: list[dict[str, float]]) -> None:
    """One log line when the k = 0 (original) mean P(fake) is within SATURATED of 0 or 1."""
    original = next((row for row in rows if row["k"] == 0), None)
    if original is not None and not SATURATED <= original["p_fake"] <= 1 - SATURATED:
        log.warning("classifier saturated at the original samples (P(fake) %.4f): P(fake) barely moves along the "
                    "shift; compare logits (mean log-odds of P(fake), logit %.2f at k=0) instead",
                    original["p_fake"], original["logit"])


def _write_metrics(out: Path, rows: list[dict[str, float]], info: dict[str, Any]) -> None:
    write_json(out / "metrics.json", {**info, "sign_convention": SIGN_CONVENTION, "rows": rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f for f in METRIC_FIELDS if f in rows[0]], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows)
    write_text(out / "metrics.csv", buffer.getvalue())


def run_exaggerate(config: ExaggerateConfig, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Fit the eq. 3 shift, score G(z − k·w) on held-out latents, write the study's files into OUT.

    OUT receives config.yaml, metrics.jsonl (one line per Adam step), shift.pt + shift.json, then
    metrics.json/.csv (per k: mean P(fake), mean LPIPS to the original) and grid.png. An existing OUT
    is refused unless `resume` (keeps a finished shift of the same settings and re-scores it, e.g.
    with other ks; an unfinished fit starts again) or `force` (fits again).

    Under torchrun every rank fits and scores its share (`ShiftExaggeration`: `batch_size` is the global batch,
    a multiple of the number of processes); rank 0 alone checks and writes OUT, its refusals reach every rank.
    """
    with distributed.alike():
        for name in ("generator", "classifier", "out"):
            require(config, name)
        distributed.check_global_batch(config.batch_size)
        eval_seed = _eval_seed(config)
        device = distributed.setup(resolve_device(config.device))
    distributed.run_on_main(_check_out, config, resume, force)
    out = Path(config.out)
    with distributed.alike():
        attack, space, meta = _open_attack(config, device)
    shift, final = distributed.run_on_main(_prepare_out, config, meta, attack.dim, force)
    fitted = shift is None
    if fitted:
        result = attack.fit(config.steps, config.batch_size, config.lr, config.seed)
        shift, final = result.shift, result.final
        meta.update(final=final, compile=attack.compiled)  # False where a first compiled call fell back
        distributed.run_on_main(_write_fit, out, result.history, shift, meta)
    else:
        log.info("%s: reusing the fitted shift (resume); re-scoring it", out)
        meta["final"] = final
    sweep = attack.sweep(shift, config.ks, config.eval_n, eval_seed, config.eval_batch_size)
    rows = rows_with_logits(sweep)
    if distributed.is_main():
        warn_if_saturated(rows)
    info = {"space": space, "eval_seed": eval_seed, "eval_n": config.eval_n, "aggregation": config.aggregation,
            "logit": LOGIT_MEANING}
    distributed.run_on_main(_write_scores, out, rows, info, shift, meta)
    grid = out / "grid.png"
    if config.grid_rows:
        shown = attack.sweep(shift, config.ks, config.grid_rows, eval_seed, config.eval_batch_size, keep_images=True)
        distributed.run_on_main(lambda: save_image(grid, render_shift_grid(shown, space, eval_seed)))
    else:
        distributed.run_on_main(grid.unlink, missing_ok=True)  # never leave the grid of an earlier shift beside it
    return {"out": str(out), "space": space, "fitted": fitted, "shift_norm": float(shift.norm()),
            "eval_seed": eval_seed, "rows": rows, "grid": str(grid) if config.grid_rows else None}


def _open_attack(config: ExaggerateConfig, device: torch.device) -> tuple[ShiftExaggeration, str, dict[str, Any]]:
    """The classifier, LPIPS and generator on `device`, the attack configured, and the fit's metadata."""
    precision = resolve_precision(config.precision, device)
    configure_backends(device)
    classifier_file = resolve_checkpoint(config.classifier, config.which)
    classifier, classifier_meta = load_classifier(classifier_file, device=device)
    lpips_model = _lpips_for(config, device)  # before the generator: a missing file fails fast
    generator = open_generator(config.generator, config.weights or None, config.latent_dim, config.resolution)
    try:
        space = resolve_space(generator, config.space)
    except ValueError as err:
        raise InputError(f"--space {config.space}: {err}") from None
    trained = ClassifierInput.from_meta(classifier_meta)
    view = ClassifierInput(config.load_size or trained.load_size, config.crop_size or trained.crop_size)
    warn_size_mismatch(classifier_meta.get("config"), view.load_size, view.crop_size, log)
    attack = ShiftExaggeration(generator, classifier, lpips_model, lam=config.lam, space=space,
                               classifier_input=view, aggregation=config.aggregation, device=device,
                               precision=precision, compile=config.compile)
    meta = {"space": space, "generator": str(config.generator),
            "generator_sha256": generator_sha256(config.generator, generator),
            **({"generator_source": provenance(generator)} if provenance(generator) else {}),
            "classifier": str(classifier_file), "classifier_sha256": checkpoint_sha256(classifier_file),
            "classifier_model": classifier_meta.get("model"), "load_size": view.load_size,
            "crop_size": view.crop_size, "lam": config.lam, "steps": config.steps,
            "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed, "precision": precision,
            "compile": attack.compiled,
            "lpips": None if lpips_model is None else f"{config.lpips_net}: {lpips_model.source}"}
    return attack, space, meta
