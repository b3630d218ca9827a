"""Latent-shift exaggeration (paper eq. 3): learn one shift w that makes a generator's samples more fake
to a frozen patch classifier, score G(z − k·w) along it, save and load it. Used by analysis.shift_grid.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchscope.attacks.latent_optim import frozen, optimize_latents
from patchscope.common import distributed
from patchscope.common.atomic import atomic_open, write_json
from patchscope.common.compiled import CompiledOrEager, maybe_compile
from patchscope.common.device import autocast
from patchscope.common.errors import InputError
from patchscope.common.labels import FAKE, targets
from patchscope.common.progress import progress_bar
from patchscope.forensics.data import resized_shape
from patchscope.forensics.scoring import AGGREGATIONS, image_scores, patch_cross_entropy
from patchscope.generators.base import Generator, StyleGenerator

SPACES = ("z", "w")
DEFAULT_KS = (-2.0, -1.0, 0.0, 1.0, 2.0)
# The paper shows G(z − k·w) and G(z + k·w). Here w is learned so that z − w is MORE fake, and column k
# is always G(z − k·w): k > 0 exaggerates what the classifier detects, k < 0 removes it, k = 0 is the
# original. The same sentence goes into shift.json and the grid title.
SIGN_CONVENTION = ("column k shows G(z - k*w) (in w space: synthesis(mapping(z) - k*w)); w was learned so "
                   "that z - w is more fake: k > 0 more fake, k < 0 less fake, k = 0 the original")
SHIFT_KIND = "patchscope-shift"
SHIFT_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- latents and inputs

def default_space(generator: Generator) -> str:
    """w for style generators (where the paper's StyleGAN edits live), z for the others."""
    return "w" if isinstance(generator, StyleGenerator) else "z"


def resolve_space(generator: Generator, space: str) -> str:
    """`auto` -> the default space; a space the generator lacks is a ValueError."""
    if space == "auto":
        return default_space(generator)
    if space not in SPACES:
        raise ValueError(f"space must be auto or one of {SPACES}, not {space!r}")
    if space == "w" and not isinstance(generator, StyleGenerator):
        raise ValueError(f"space 'w' needs a style generator (mapping/synthesis); "
                         f"{type(generator).__name__} has only z")
    return space


def shift_dim(generator: Generator, space: str) -> int:
    return generator.w_dim if space == "w" else generator.latent_dim


def step_seed(seed: int, step: int) -> int:
    """The latent seed of training step `step`: every step draws a fresh batch, reproducibly."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def training_seeds(seed: int, steps: int) -> set[int]:
    """Every latent seed a fit of `steps` steps draws from (the last one scores the final shift)."""
    return {step_seed(seed, step) for step in range(steps + 1)}


def check_held_out(seed: int, steps: int, eval_seed: int) -> None:
    """Refuse an evaluation seed whose latents the fit has seen, so metrics are on held-out samples."""
    if eval_seed in training_seeds(seed, steps):
        raise ValueError(f"evaluation seed {eval_seed} is one of the training batch seeds of seed {seed}; "
                         f"choose another evaluation seed")


@dataclass(frozen=True)
class ClassifierInput:
    """The classifier's view of a generated image: clipped to [-1, 1], shorter side resized to
    `load_size`, centre-cropped to `crop_size` (the classifier run's settings; None keeps the size).

    The paper saves samples as PNG and Lanczos-resizes them on the CPU; here the resize runs on the
    device, antialiased bilinear, and without the 8-bit rounding, so gradients reach the latents.
    """

    load_size: int | None = None
    crop_size: int | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ClassifierInput:
        """The sizes a classifier was trained with, from its checkpoint metadata."""
        trained = meta.get("config", {}) if isinstance(meta, dict) else {}
        return cls(trained.get("load_size"), trained.get("crop_size"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.clamp(-1, 1)  # the classifier only ever saw saved images, clipped to [-1, 1]
        height, width = x.shape[-2:]
        size = resized_shape(height, width, self.load_size)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            height, width = size
        if self.crop_size is not None and (height, width) != (self.crop_size, self.crop_size):
            if self.crop_size > min(height, width):
                raise ValueError(f"crop {self.crop_size} px is larger than the {height}x{width} image")
            # torchvision CenterCrop's rounding, as forensics.data crops for evaluation
            top, left = round((height - self.crop_size) / 2), round((width - self.crop_size) / 2)
            x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        return x


Renderer = Callable[[torch.Tensor], torch.Tensor]


class Synthesis(nn.Module):
    """A style generator's `synthesis` as a module's forward, so that `--compile` can compile what renders w."""

    def __init__(self, generator: StyleGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, ws: torch.Tensor, noise_mode: str | None = None) -> torch.Tensor:
        return self.generator.synthesis(ws, noise_mode=noise_mode)


def latent_batch(generator: Generator, space: str, n: int, seed: int, start: int, device: torch.device,
                 network: Callable[..., torch.Tensor] | None = None) -> tuple[torch.Tensor, Renderer]:
    """Rows start..start+n-1 of the latent stream for `seed` in `space`, and latents -> images.

    Random inputs besides the latent (Glow's split levels, style noise) are fixed per row, so
    G(z) and G(z − k·w) differ only by the shift: at k = 0 they are the same image. `network` stands in for
    the generator's forward (its `Synthesis` for style generators), e.g. compiled; the mapping stays eager.
    """
    z = generator.sample_latents(n, seed, start).to(device)
    if not isinstance(generator, StyleGenerator):
        forward, opts = generator if network is None else network, {}
        if hasattr(generator, "sample_split_noise"):  # Glow: its split levels, drawn once per image
            opts["split_noise"] = [level.to(device) for level in generator.sample_split_noise(n, seed, start)]
        return z, lambda latents: forward(latents, **opts)
    noise_mode = "const" if generator.noise_mode == "random" else None
    network = Synthesis(generator) if network is None else network
    synthesis = lambda ws: network(ws, noise_mode=noise_mode)  # noqa: E731
    if space == "w":
        with torch.no_grad():
            return generator.mapping(z), synthesis
    return z, lambda latents: synthesis(generator.mapping(latents))


def shifted(latents: torch.Tensor, shift: torch.Tensor, k: float) -> torch.Tensor:
    """latents − k·shift; w-space latents [N, num_ws, w_dim] move on every layer alike."""
    return latents - k * shift.to(latents.dtype)


# ----------------------------------------------------------------------------- the attack

@dataclass
class ShiftResult:
    shift: torch.Tensor                 # [latent_dim] (z) or [w_dim] (w), float32, CPU
    space: str
    history: list[dict[str, float]]     # per step, before its update: loss, fake_loss, lpips, p_fake
    final: dict[str, float]             # the same terms for the returned shift, on one more fresh batch
    settings: dict[str, Any] = field(default_factory=dict)  # lam, steps, batch, lr, seed


@dataclass
class ShiftSweep:
    ks: tuple[float, ...]
    p_fake: torch.Tensor                # [n, K] classifier P(fake) of G(z − k·w)
    lpips: torch.Tensor | None          # [n, K] LPIPS(G(z), G(z − k·w)), None without an LPIPS model
    images: torch.Tensor | None = None  # [n, K, 3, R, R] in [-1, 1] when kept

    def rows(self) -> list[dict[str, float]]:
        """One row per k: mean and standard deviation of P(fake) (and LPIPS) over the samples."""
        rows = []
        for j, k in enumerate(self.ks):
            p = self.p_fake[:, j].double()
            row = {"k": float(k), "n": int(p.numel()), "p_fake": float(p.mean()), "p_fake_std": float(p.std())}
            if self.lpips is not None:
                row.update(lpips=float(self.lpips[:, j].double().mean()),
                           lpips_std=float(self.lpips[:, j].double().std()))
            rows.append(row)
        return rows


class ShiftExaggeration:
    """Eq. 3: w* = argmin_w E_z[ L_fake(C(G(z − w))) + λ · LPIPS(G(z), G(z − w)) ].

    Configured once, torchattacks-style; `fit` learns w over fresh latent batches, `sweep`
    scores G(z − k·w) on given latents. L_fake is the patch cross entropy towards "fake" (eq. 1)
    on the classifier's view of the image (`ClassifierInput`). Generator, classifier and LPIPS
    are moved to `device` and frozen while in use. `precision="bf16"` autocasts the forward passes. `compile`:
    the classifier, the generator's forward (synthesis for style generators) and LPIPS run `torch.compile`d
    (`common.compiled.maybe_compile`: eager after one warning where the compiler cannot run), a single backward.

    Under torchrun every rank runs `fit` and `sweep` alike: a fit step's global batch is split into contiguous
    per-rank slices, each rank's loss is its share of the mean over the global batch, and the gradient of w is
    summed over the ranks before each Adam step, so every rank holds the single-process w (up to the order of
    the additions); `sweep` scores every world_size-th batch and gathers the rows in index order.
    """

    def __init__(self, generator: Generator, classifier: nn.Module, lpips: nn.Module | None = None, *,
                 lam: float = 1.0, space: str = "auto", classifier_input: ClassifierInput | None = None,
                 aggregation: str = "after_softmax", device: str | torch.device = "cpu",
                 precision: str = "fp32", compile: bool = False) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if lam > 0 and lpips is None:
            raise ValueError("lam > 0 needs an LPIPS model (attacks.perceptual.load_lpips)")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 (resolve auto with common.device), not {precision!r}")
        self.device = torch.device(device)
        self.generator = generator.to(self.device)
        self.classifier = classifier.to(self.device, memory_format=torch.channels_last)
        self.lpips = lpips.to(self.device) if lpips is not None else None
        self.lam = float(lam)
        self.space = resolve_space(generator, space)
        self.view = classifier_input or ClassifierInput()
        self.aggregation = aggregation
        self.precision = precision
        # what the attack calls: the networks above, compiled when asked; the attributes above stay the networks
        self._classifier = maybe_compile(self.classifier, compile, self.device, "the classifier")
        self._render = maybe_compile(Synthesis(self.generator) if isinstance(self.generator, StyleGenerator)
                                     else self.generator, compile, self.device, "the generator")
        self._lpips = None if self.lpips is None else maybe_compile(self.lpips, compile, self.device, "LPIPS")

    @property
    def compiled(self) -> bool:
        """Whether a network runs compiled (asked for, the compiler runs here, and no first call fell back)."""
        return any(isinstance(net, CompiledOrEager) and net.compiled
                   for net in (self._classifier, self._render, self._lpips))

    @property
    def dim(self) -> int:
        return shift_dim(self.generator, self.space)

    def _networks(self) -> list[nn.Module]:
        return [net for net in (self.generator, self.classifier, self.lpips) if net is not None]

    def _classify(self, images: torch.Tensor) -> torch.Tensor:
        x = self.view(images).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self._classifier(x).float()

    def _terms(self, shift: torch.Tensor, seed: int, batch: int) -> dict[str, torch.Tensor]:
        """The loss terms of this rank's slice of rows 0..batch-1, each a mean over its slice times
        slice/batch: summed over the ranks, means over the global batch (in one process, the means)."""
        start, n = distributed.share_of(batch, "batch")
        latents, render = latent_batch(self.generator, self.space, n, seed, start, self.device, self._render)
        with autocast(self.device, self.precision):
            with torch.no_grad():
                original = render(latents).float().clamp(-1, 1)
            moved = render(shifted(latents, shift, 1.0)).float()
        logits = self._classify(moved)
        terms = {"fake_loss": patch_cross_entropy(logits, targets(n, FAKE, self.device))}
        terms["loss"] = terms["fake_loss"]
        if self.lpips is not None:
            needs_graph = torch.is_grad_enabled() and self.lam > 0  # at λ = 0 LPIPS is only reported
            with autocast(self.device, self.precision), torch.set_grad_enabled(needs_graph):
                terms["lpips"] = self._lpips(original, moved.clamp(-1, 1)).float().mean()
            if self.lam > 0:
                terms["loss"] = terms["loss"] + self.lam * terms["lpips"]
        terms["p_fake"] = image_scores(logits.detach(), self.aggregation).mean()
        if n != batch:
            terms = {name: value * (n / batch) for name, value in terms.items()}
        return terms

    def fit(self, steps: int = 500, batch: int = 16, lr: float = 0.01, seed: int = 0,
            progress: bool = True) -> ShiftResult:
        """Learn w with Adam from zero; step s draws a fresh batch from `step_seed(seed, s)`."""
        if steps < 0 or batch < 1 or lr <= 0 or seed < 0:
            raise ValueError(f"expected steps >= 0, batch >= 1, lr > 0, seed >= 0; got steps={steps}, "
                             f"batch={batch}, lr={lr}, seed={seed}")
        records: list[dict[str, torch.Tensor]] = []
        distributed.share_of(batch, "batch")  # refuse an indivisible global batch before any step
        bar = progress_bar(total=steps, desc=f"exaggerating ({self.space})", unit="step", leave=False,
                           disable=not progress or not distributed.is_main())

        def loss_fn(latents: dict[str, torch.Tensor], step: int) -> torch.Tensor:
            terms = self._terms(latents["shift"], step_seed(seed, step), batch)
            names = list(terms)
            summed = distributed.all_reduce_sum(torch.stack([terms[k].detach() for k in names]))  # global means
            records.append(dict(zip(names, summed)))
            return terms["loss"]

        def report(step: int, losses: torch.Tensor, latents: dict[str, torch.Tensor]) -> None:
            bar.update(1)
            if step % 25 == 0:  # a host sync; not every step
                bar.set_postfix(loss=f"{float(records[-1]['loss']):.4f}", refresh=False)  # global batch's

        with frozen(*self._networks()), bar:
            result = optimize_latents({"shift": torch.zeros(self.dim)}, loss_fn, steps, lr, keep="final",
                                      callback=report, device=self.device,
                                      after_backward=distributed.all_reduce_grads)
        history = [{k: float(v) for k, v in record.items()} for record in records]
        settings = {"lam": self.lam, "steps": steps, "batch": batch, "lr": lr, "seed": seed}
        return ShiftResult(result.latents["shift"].cpu(), self.space, history[:-1], history[-1], settings)

    def check_shift(self, shift: torch.Tensor) -> torch.Tensor:
        shift = torch.as_tensor(shift).detach().float().cpu()
        if shift.shape != (self.dim,):
            raise ValueError(f"shift has shape {list(shift.shape)}; {type(self.generator).__name__} in "
                             f"{self.space} space needs [{self.dim}]")
        return shift

    @torch.no_grad()
    def sweep(self, shift: torch.Tensor, ks: Sequence[float] = DEFAULT_KS, n: int = 64, seed: int = 1,
              batch: int = 16, keep_images: bool = False) -> ShiftSweep:
        """P(fake) (and LPIPS to the original) of G(z − k·w) for rows 0..n-1 of `seed`'s latents."""
        shift = self.check_shift(shift).to(self.device)
        if n < 1 or batch < 1 or not ks:
            raise ValueError(f"expected n >= 1, batch >= 1 and at least one k; got n={n}, batch={batch}, ks={ks}")
        scored: list[tuple[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]] = []
        world, rank = distributed.world_size(), distributed.rank()
        with frozen(*self._networks()):
            for number, first in enumerate(range(0, n, batch)):
                if number % world != rank:  # under torchrun: every world_size-th batch, whole
                    continue
                latents, render = latent_batch(self.generator, self.space, min(batch, n - first), seed, first,
                                               self.device, self._render)
                with autocast(self.device, self.precision):
                    original = render(latents).float().clamp(-1, 1)
                p_cols, lpips_cols, image_cols = [], [], []
                for k in ks:
                    with autocast(self.device, self.precision):
                        moved = render(shifted(latents, shift, float(k))).float().clamp(-1, 1)
                    p_cols.append(image_scores(self._classify(moved), self.aggregation).cpu())
                    if self.lpips is not None:
                        with autocast(self.device, self.precision):
                            lpips_cols.append(self._lpips(original, moved).float().cpu())
                    if keep_images:
                        image_cols.append(moved.cpu())
                scored.append((first, (torch.stack(p_cols, dim=1),
                                       torch.stack(lpips_cols, dim=1) if lpips_cols else None,
                                       torch.stack(image_cols, dim=1) if keep_images else None)))
        batches = distributed.gather_keyed(scored)  # every batch, in row order, on every rank
        p_rows = [p for p, _, _ in batches]
        lpips_rows = [d for _, d, _ in batches if d is not None]
        image_rows = [i for _, _, i in batches if i is not None]
        return ShiftSweep(tuple(float(k) for k in ks), torch.cat(p_rows),
                          torch.cat(lpips_rows) if lpips_rows else None,
                          torch.cat(image_rows) if keep_images else None)


def optimize_shift(generator: Generator, classifier: nn.Module, lpips: nn.Module | None, *, steps: int = 500,
                   batch: int = 16, lr: float = 0.01, seed: int = 0, **options: Any) -> ShiftResult:
    """`ShiftExaggeration(generator, classifier, lpips, **options).fit(steps, batch, lr, seed)`."""
    return ShiftExaggeration(generator, classifier, lpips, **options).fit(steps, batch, lr, seed)


def evaluate_shift(generator: Generator, classifier: nn.Module, shift: torch.Tensor,
                   ks: Sequence[float] = DEFAULT_KS, n: int = 256, seed: int = 1, *,
                   lpips: nn.Module | None = None, batch: int = 16, **options: Any) -> list[dict[str, float]]:
    """Per k: mean P(fake) of G(z − k·w) and mean LPIPS to G(z) over `n` latents of `seed`.

    Use a seed the fit never drew (`check_held_out`): the numbers are then on held-out samples.
    """
    attack = ShiftExaggeration(generator, classifier, lpips, lam=0.0, **options)
    return attack.sweep(shift, ks, n, seed, batch).rows()


# ----------------------------------------------------------------------------- files

def save_shift(out: str | os.PathLike, shift: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write OUT/shift.pt ({"shift": tensor}, readable with weights_only) and OUT/shift.json, atomically."""
    out = Path(out)
    with atomic_open(out / "shift.pt", "wb") as handle:
        torch.save({"shift": shift.detach().float().cpu().contiguous()}, handle)
    write_json(out / "shift.json", {"kind": SHIFT_KIND, "format_version": SHIFT_FORMAT_VERSION,
                                    "sign_convention": SIGN_CONVENTION, "dim": int(shift.numel()), **meta})
    return out / "shift.pt"


def load_shift(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(shift, metadata) from a folder holding shift.pt + shift.json, or from either file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights, meta_path = folder / "shift.pt", folder / "shift.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{meta_path}: missing or unreadable shift metadata (expected the shift.json "
                         f"that `patchscope exaggerate` writes beside shift.pt)") from None
    if not isinstance(meta, dict) or meta.get("kind") != SHIFT_KIND:
        raise InputError(f"{meta_path}: not a patchscope shift file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, torn or foreign: name the file, never execute it
        raise InputError(f"{weights}: unreadable shift tensor file ({type(err).__name__})") from None
    shift = state.get("shift") if isinstance(state, dict) else None
    if not isinstance(shift, torch.Tensor) or shift.ndim != 1 or shift.numel() != meta.get("dim"):
        raise InputError(f"{weights}: expected {{'shift': 1-d tensor of {meta.get('dim')} values}}")
    return shift, meta
