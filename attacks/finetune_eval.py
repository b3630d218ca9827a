"""How a finetuned generator fares against the frozen classifier: P(fake) of its samples and of real images,
accuracy/AP (forensics.scoring), and LPIPS drift from the original. Used by attacks.finetune and the study.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from patchscope.attacks.latent_optim import frozen
from patchscope.attacks.real_batches import RealImages
from patchscope.attacks.shift import ClassifierInput
from patchscope.common.device import autocast
from patchscope.common.labels import FAKE, REAL, targets
from patchscope.forensics.scoring import AGGREGATIONS, compute_metrics, image_scores
from patchscope.generators.base import Generator

ORIGINAL, FINETUNED = "original", "finetuned"


class SampleJudge:
    """The frozen classifier's P(fake) of images (its own view of them, `ClassifierInput`), generator
    samples in fixed-size chunks, and LPIPS between two sets of samples when an LPIPS model is given."""

    def __init__(self, classifier: nn.Module, view: ClassifierInput | None = None, aggregation: str = "after_softmax",
                 lpips: nn.Module | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
                 batch: int = 16) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.device = torch.device(device)
        self.classifier = classifier
        self.view = view or ClassifierInput()
        self.aggregation = aggregation
        self.lpips = lpips
        self.precision = precision
        self.batch = batch

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits of [-1, 1]-ish images (clipped, resized and cropped as the classifier was trained)."""
        x = self.view(images).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.classifier(x).float()

    @torch.no_grad()
    def p_fake(self, images: torch.Tensor) -> torch.Tensor:
        with frozen(self.classifier):
            return torch.cat([image_scores(self.logits(images[i:i + self.batch].to(self.device)), self.aggregation)
                              for i in range(0, len(images), self.batch)]).cpu()

    @torch.no_grad()
    def samples(self, generator: Generator, n: int, seed: int, start: int = 0) -> torch.Tensor:
        """Samples start..start+n-1 of `seed` (the paper's latent stream) on the device, clipped to [-1, 1].
        Generated in chunks of the judge's batch size, so an image does not depend on n."""
        z = generator.sample_latents(n, seed, start)
        with frozen(generator):
            parts = []
            for i in range(0, n, self.batch):
                with autocast(self.device, self.precision):
                    parts.append(generator(z[i:i + self.batch].to(self.device)).float().clamp(-1, 1))
        return torch.cat(parts)

    @torch.no_grad()
    def distance(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
        """Per-image LPIPS between two equally long image sets (CPU), or None without an LPIPS model."""
        if self.lpips is None:
            return None
        parts = []
        for i in range(0, len(first), self.batch):
            with autocast(self.device, self.precision):
                parts.append(self.lpips(first[i:i + self.batch].to(self.device),
                                        second[i:i + self.batch].to(self.device)).float().cpu())
        return torch.cat(parts)


def real_p_fake(judge: SampleJudge, real: RealImages, indices: torch.Tensor) -> torch.Tensor:
    """P(fake) of the real images at `indices`, judged in chunks."""
    return torch.cat([judge.p_fake(real.batch(indices[i:i + judge.batch], device=judge.device))
                      for i in range(0, len(indices), judge.batch)])


def detection_metrics(p_fake_real: torch.Tensor, p_fake: torch.Tensor) -> dict[str, float | int]:
    """`compute_metrics` of real images (label REAL) against samples (label FAKE), plus the samples' mean P(fake)."""
    scores = torch.cat([p_fake_real, p_fake])
    labels = torch.cat([targets(len(p_fake_real), REAL), targets(len(p_fake), FAKE)])
    return {**compute_metrics(scores, labels), "p_fake": float(p_fake.double().mean())}


@dataclass
class Comparison:
    """The original and the finetuned generator on the same latents 0..n-1 of `seed`."""

    seed: int
    p_fake_real: torch.Tensor                 # [m] P(fake) of the real images
    p_fake: dict[str, torch.Tensor]           # ORIGINAL / FINETUNED -> [n] P(fake) of their samples
    lpips: torch.Tensor | None                # [n] LPIPS(original sample, finetuned sample)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # first kept samples, [-1, 1], CPU

    def rows(self) -> list[dict[str, Any]]:
        """One row per generator: accuracy (all, real, fake), AP and mean P(fake) vs the real images,
        and the mean LPIPS to the original's samples."""
        rows = []
        for name in (ORIGINAL, FINETUNED):
            row: dict[str, Any] = {"generator": name, **detection_metrics(self.p_fake_real, self.p_fake[name])}
            if self.lpips is not None:
                row["lpips_to_original"] = 0.0 if name == ORIGINAL else float(self.lpips.double().mean())
            rows.append(row)
        return rows


def compare_generators(original: Generator, finetuned: Generator, judge: SampleJudge, real: RealImages,
                       real_indices: torch.Tensor, n: int, seed: int, keep_images: int = 0) -> Comparison:
    """Score both generators' samples of the same latents 0..n-1 of `seed` against the same real images;
    a chunk at a time, so only the first `keep_images` samples of each are held in memory."""
    p_fake: dict[str, list[torch.Tensor]] = {ORIGINAL: [], FINETUNED: []}
    images: dict[str, list[torch.Tensor]] = {ORIGINAL: [], FINETUNED: []}
    distances = []
    for start in range(0, n, judge.batch):
        count = min(judge.batch, n - start)
        chunk = {name: judge.samples(generator, count, seed, start)
                 for name, generator in ((ORIGINAL, original), (FINETUNED, finetuned))}
        for name, samples in chunk.items():
            p_fake[name].append(judge.p_fake(samples))
            if start < keep_images:
                images[name].append(samples[:keep_images - start].cpu())
        distances.append(judge.distance(chunk[ORIGINAL], chunk[FINETUNED]))
    lpips = torch.cat(distances) if judge.lpips is not None else None
    return Comparison(seed, real_p_fake(judge, real, real_indices), {k: torch.cat(v) for k, v in p_fake.items()},
                      lpips, {k: torch.cat(v) for k, v in images.items() if v})
