"""Generator finetuning against a frozen classifier (paper eq. 4): the GAN keeps training on real images with
its own loss while the classifier must call its samples real. Used by analysis.finetune_study and the benchmarks.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscope.attacks import finetune_ddp as ddp
from patchscope.attacks.finetune_anchor import (ANCHOR_ADAM, Anchor, FinetuneSettings, default_ema_beta, divergence,
                                               warn_slow_average)
from patchscope.attacks.finetune_eval import FINETUNED, Comparison, SampleJudge, compare_generators
from patchscope.attacks.finetune_files import (METRICS_FILE, RESUME_FILE, commit_checkpoint, committed,
                                              load_network_state, load_resume, network_state, truncate_log)
from patchscope.attacks.finetune_nets import compiled_step_networks, copy_without_discriminator, runs_compiled
from patchscope.attacks.gan_objectives import GANObjective, objective_for
from patchscope.attacks.latent_optim import frozen
from patchscope.attacks.real_batches import RealImages
from patchscope.attacks.shift import ClassifierInput
from patchscope.common import distributed
from patchscope.common.atomic import append_line
from patchscope.common.device import autocast
from patchscope.common.labels import REAL, targets
from patchscope.common.progress import ProgressBar, progress_bar
from patchscope.common.runfolder import refuse_changes
from patchscope.forensics.scoring import patch_cross_entropy
from patchscope.generators.base import Generator, StyleGenerator
from patchscope.generators.custom import module_source
from patchscope.generators.io.writers import check_writable, file_name, written_format
from patchscope.generators.stylegan2.model import StyleGAN2Discriminator
from patchscope.generators.training.schedule import batch_indices, derive_seed

__all__ = ["FinetuneResult", "FinetuneSettings", "GeneratorFinetuner"]  # FinetuneSettings: finetune_anchor's
log = logging.getLogger("patchscope.finetune")

# Purposes of derived seeds (generators.training.schedule uses 0-2 for its own streams).
STEP_DRAWS, NOISE_DRAWS, REAL_ORDER, EVAL_REALS = 20, 21, 22, 23
W_AVG_BETA = 0.995  # StyleGAN2 tracks the truncation centre as a moving mean of w (NVlabs' w_avg_beta)
# Settings (of `GeneratorFinetuner.settings`) a resume may change: the divergence guard's threshold, the
# arithmetic a resume on another device resolves to (precision; compile, where the compiler runs), and the file
# format, which the generator's class fixes.
RESUMABLE_CHANGES = ("max_loss", "precision", "compile", "format")


@dataclass
class FinetuneResult:
    generator: Generator              # the averaged (EMA) generator, eval mode: what the checkpoint holds
    trained: Generator                # the generator Adam trained; `generator` is its moving average
    discriminator: nn.Module | None   # the finetuned discriminator (None: finetuned with the anchor)
    steps: int                        # steps done (with `stopped`: the step of the last good state)
    stopped: str | None               # why the divergence guard stopped the run; None when it finished
    history: list[dict[str, Any]]     # the metrics.jsonl records
    checkpoint: Path | None           # OUT/generator.pt (.safetensors) holding `generator`, when one was written
    settings: dict[str, Any] = field(default_factory=dict)


class _Run(ddp.Run):
    def write(self, line: str) -> None:  # through this module's append_line (the fault tests replace it)
        append_line(self.out / METRICS_FILE, line)


class GeneratorFinetuner:
    """Eq. 4: min_G max_D [ L_GAN(G, D) + w · L_real(G, C) ], C frozen.

    The generator keeps training with its discriminator and its own GAN loss (`objective_for`:
    WGAN-GP + drift for PGAN, logistic + R1 for StyleGAN2) on `real_images`, and its samples must
    look real to the classifier: patch cross entropy towards real (0) on `ClassifierInput`-prepared
    samples, weighted by `classifier_weight`. A moving average (EMA) of the generator is what the run
    outputs. `generator` is left as it is and serves as the original G0. Without a `.discriminator`, an
    `Anchor` (LPIPS and/or L2 between G(z) and G0(z), `settings.anchor`) keeps G near G0 instead of the GAN loss.
    Under torchrun every rank trains on its slice of each global batch (`finetune_ddp`); the in-run evaluation and
    every file are rank 0's. `compile`: the generator's forward and the classifier run compiled (`finetune_nets`).
    """

    def __init__(self, generator: Generator, classifier: nn.Module, real_images: RealImages | torch.Tensor,
                 settings: FinetuneSettings | None = None, *, objective: GANObjective | None = None,
                 classifier_input: ClassifierInput | None = None, lpips: nn.Module | None = None,
                 device: str | torch.device = "cpu", compile: bool = False) -> None:
        settings = settings or FinetuneSettings()
        precision = settings.precision
        check_writable(generator)
        self.anchor: Anchor | None = None
        self.objective: GANObjective | None = None
        if generator.discriminator is None:
            self.anchor = Anchor(settings.anchor, settings.anchor_weight, lpips)
            log.info("no discriminator: keeping G near the original with %s", self.anchor.describe())
        else:  # a discriminator of the user's own (MODULE:CALLABLE) trains with the logistic loss + R1
            self.objective = objective or objective_for(generator.discriminator,
                                                        generic=module_source(generator) is not None)
        self.device = torch.device(device)
        self.precision = precision
        self.classifier_weight, self.n_critic = float(settings.classifier_weight), settings.n_critic
        self.ema_auto = settings.ema_beta is None  # resolved from the steps by `run` (default_ema_beta)
        self.ema_beta = 0.0 if self.ema_auto else float(settings.ema_beta)
        self.mirror, self.max_loss = settings.mirror, float(settings.max_loss)
        self.original = generator.to(self.device)
        self.generator = copy_without_discriminator(generator).train().requires_grad_(True)
        self.average = copy_without_discriminator(generator).eval().requires_grad_(False)
        self.discriminator = None if generator.discriminator is None else copy.deepcopy(
            generator.discriminator).to(self.device).train().requires_grad_(True)
        self.real = real_images if isinstance(real_images, RealImages) else RealImages(real_images,
                                                                                       generator.resolution)
        if self.real.resolution != generator.resolution:
            raise ValueError(f"real images are {self.real.resolution} px, the generator makes "
                             f"{generator.resolution} px")
        own = self.objective or ANCHOR_ADAM
        self.lr = float(settings.lr if settings.lr is not None else own.lr)
        self.betas = tuple(float(b) for b in (settings.betas if settings.betas is not None else own.betas))
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)
        self.optimizer_d = None if self.objective is None else self.objective.discriminator_optimizer(
            self.discriminator.parameters(), self.lr, self.betas)
        self.classifier = classifier.to(self.device, memory_format=torch.channels_last)
        self._forward, scorer = compiled_step_networks(self.generator, self.classifier, compile, self.device)
        self.judge = SampleJudge(scorer, classifier_input, settings.aggregation, lpips, self.device, precision,
                                 settings.eval_batch)
        self.step = 0
        self._sums: dict[str, torch.Tensor] = {}  # losses summed since the last log line, on the device
        self._counts: dict[str, int] = {}  # steps that reported each (lazy R1 reports every k-th step)
        self._good = self._snapshot()  # what a diverging run falls back to

    # ------------------------------------------------------------------------- one step

    def _generate(self, z: torch.Tensor, network: Generator | None = None, noise_mode: str = "random") -> torch.Tensor:
        style = isinstance(self.generator if network is None else network, StyleGenerator)
        network = self._forward if network is None else network  # the trained generator's, compiled when asked
        with autocast(self.device, self.precision):
            if style:  # trained as StyleGAN2 trains: no truncation, fresh noise (seeded per step)
                return network(z, psi=1, noise_mode=noise_mode).float()
            return network(z).float()

    def _critic(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.discriminator(images).float()

    def _classifier_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return patch_cross_entropy(self.judge.logits(fake), targets(fake.shape[0], REAL, self.device))

    def _latents(self, batch: int, draws: torch.Generator) -> torch.Tensor:
        """A step's latents: N(0, 1), or from a MODULE:CALLABLE's own sampler, seeded by the step's draws."""
        if getattr(self.generator, "stock_latents", True):
            return torch.randn(batch, self.generator.latent_dim, generator=draws)
        return self.generator.sample_latents(batch, int(torch.randint(2 ** 31, (1,), generator=draws)))

    def _train_step(self, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """One step: `n_critic` discriminator updates, one generator update, the average; detached losses."""
        draws = torch.Generator().manual_seed(derive_seed(seed, STEP_DRAWS, self.step))
        if self.anchor is not None:
            z = ddp.local(self._latents(batch, draws), batch)
            return ddp.reduce_losses(self._anchored_step(z.to(self.device), batch), batch)
        parts: dict[str, torch.Tensor] = {}
        for i in range(self.n_critic):
            d_step = self.step * self.n_critic + i
            z = ddp.local(self._latents(batch, draws), batch).to(self.device)
            flip = ddp.local(torch.rand(batch, generator=draws) < 0.5, batch) if self.mirror else None
            order = ddp.local(batch_indices(len(self.real), batch, d_step, seed, REAL_ORDER), batch)
            real = self.real.batch(order, flip, self.device)
            with torch.no_grad():
                fake = self._generate(z)
            loss_d, parts = self.objective.discriminator_loss(self._critic, real, fake, d_step, draws)
            self.optimizer_d.zero_grad(set_to_none=True)
            ddp.scaled(loss_d, batch).backward()
            ddp.sync_gradients(self.discriminator)
            self.optimizer_d.step()
        z = ddp.local(self._latents(batch, draws), batch).to(self.device)
        # The generator's step needs gradients through D and C, not for their weights.
        self.discriminator.requires_grad_(False)
        try:
            fake = self._generate(z)
            loss_gan = self.objective.generator_loss(self._critic(fake))
            if self.classifier_weight > 0:
                loss_classifier = self._classifier_loss(fake)
                loss_g = loss_gan + self.classifier_weight * loss_classifier
            else:  # reported, but kept out of the graph
                with torch.no_grad():
                    loss_classifier = self._classifier_loss(fake.detach())
                loss_g = loss_gan
            self.optimizer_g.zero_grad(set_to_none=True)
            ddp.scaled(loss_g, batch).backward()
            ddp.sync_gradients(self.generator)
            self.optimizer_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        self._update_average(z, batch)
        return ddp.reduce_losses({**parts, "loss_g_gan": loss_gan.detach(), "loss_classifier": loss_classifier.detach(),
                                  "loss_g": loss_g.detach()}, batch)

    def _anchored_step(self, z: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        """One G update without D: anchor to G0(z) + classifier loss, then the average (constant style noise)."""
        with torch.no_grad():
            target = self._generate(z, self.original, "const")
        fake = self._generate(z, noise_mode="const")
        with autocast(self.device, self.precision):
            loss_anchor, parts = self.anchor.loss(fake, target)
        loss_g = self.anchor.weight * loss_anchor
        if self.classifier_weight > 0:
            loss_classifier = self._classifier_loss(fake)
            loss_g = loss_g + self.classifier_weight * loss_classifier
        else:
            with torch.no_grad():
                loss_classifier = self._classifier_loss(fake.detach())
        self.optimizer_g.zero_grad(set_to_none=True)
        ddp.scaled(loss_g, batch).backward()
        ddp.sync_gradients(self.generator)
        self.optimizer_g.step()
        self._update_average(z, batch)
        return {**parts, "loss_anchor": loss_anchor.detach(), "loss_classifier": loss_classifier.detach(),
                "loss_g": loss_g.detach()}

    @torch.no_grad()
    def _update_average(self, z: torch.Tensor, batch: int) -> None:
        if isinstance(self.generator, StyleGenerator) and hasattr(self.generator, "w_avg"):
            w = self.generator.mapping(z, psi=1)[:, 0]
            self.generator.w_avg.copy_(ddp.batch_mean(w, batch).lerp(self.generator.w_avg, W_AVG_BETA))
        for average, current in zip(self.average.parameters(), self.generator.parameters()):
            average.lerp_(current, 1.0 - self.ema_beta)
        for average, current in zip(self.average.buffers(), self.generator.buffers()):
            average.copy_(current)

    # ------------------------------------------------------------------------- state

    def _snapshot(self) -> dict[str, Any]:
        return {"step": self.step, "generator": network_state(self.generator), "average": network_state(self.average),
                "discriminator": network_state(self.discriminator)}

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.step = int(snapshot["step"])
        load_network_state(self.generator, snapshot["generator"])
        load_network_state(self.average, snapshot["average"])
        load_network_state(self.discriminator, snapshot["discriminator"])

    def settings(self, batch: int, seed: int) -> dict[str, Any]:
        own = self.objective.settings() if self.objective is not None else self.anchor.settings()
        auto = {"ema_beta_auto": True} if self.ema_auto else {}  # the default rule's value, kept by a resume
        return {**own, **auto, "batch": batch, "seed": seed, "n_critic": self.n_critic,
                "classifier_weight": self.classifier_weight, "ema_beta": self.ema_beta, "mirror": self.mirror,
                "lr": self.lr, "betas": list(self.betas), "generator_class": type(self.generator).__name__,
                "format": written_format(self.generator), "max_loss": self.max_loss, "precision": self.precision,
                "compile": runs_compiled(self._forward, self.judge.classifier)}

    def _checkpoint(self, out: Path | None, settings: dict[str, Any]) -> None:
        """generator.pt (own format) and resume.pt as one commit (`finetune_files.commit_checkpoint`); the state
        becomes the last good one."""
        self._good = self._snapshot()
        if out is None or not distributed.is_main():
            return
        commit_checkpoint(out, self.step, self.average, self.generator, self.discriminator,
                          {**self._good, "settings": settings, "optimizer_g": self.optimizer_g.state_dict(),
                           "optimizer_d": None if self.optimizer_d is None else self.optimizer_d.state_dict(),
                           "counts": dict(self._counts),
                           "sums": {k: v.detach().cpu() for k, v in self._sums.items()}})

    def _resume(self, out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
        saved = load_resume(out)
        before = saved["settings"]
        if self.ema_auto and before.get("ema_beta_auto"):  # resolved from the first run's steps: kept
            self.ema_beta = settings["ema_beta"] = before["ema_beta"]
        with distributed.alike():  # every rank reads the same file
            refuse_changes(out / RESUME_FILE, before, settings, RESUMABLE_CHANGES)
        self._restore(saved)
        self.optimizer_g.load_state_dict(saved["optimizer_g"])
        if self.optimizer_d is not None:
            self.optimizer_d.load_state_dict(saved["optimizer_d"])
        self._sums = {k: v.to(self.device) for k, v in saved["sums"].items()}
        self._counts = {k: int(v) for k, v in saved["counts"].items()}
        self._good = self._snapshot()
        return distributed.run_on_main(truncate_log, out / METRICS_FILE, self.step)

    # ------------------------------------------------------------------------- evaluation

    def evaluation_reals(self, n: int, seed: int) -> torch.Tensor:
        """Indices of the real images judged beside samples: the first n of a fixed shuffle."""
        order = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(derive_seed(seed, EVAL_REALS)))
        return order[:n]

    def compare(self, n: int, seed: int, keep_images: int = 0, real_seed: int = 0) -> Comparison:
        """The original and the averaged generator on latents 0..n-1 of `seed`, against n real images."""
        return compare_generators(self.original, self.average, self.judge, self.real,
                                  self.evaluation_reals(n, real_seed), n, seed, keep_images)

    def _log_record(self, eval_n: int, eval_seed: int, seed: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step}
        record.update({k: round(float(v) / self._counts[k], 6) for k, v in self._sums.items()})
        self._sums, self._counts = {}, {}
        if eval_n and distributed.is_main():  # the in-run evaluation is rank 0's alone (only its log is written)
            comparison = self.compare(eval_n, eval_seed, real_seed=seed)
            row = comparison.rows()[1]
            assert row["generator"] == FINETUNED
            record.update({k: row[k] for k in ("acc", "acc_real", "acc_fake", "ap", "ap_real", "p_fake")})
            if "lpips_to_original" in row:
                record["lpips"] = row["lpips_to_original"]
        return record

    # ------------------------------------------------------------------------- the run

    def run(self, steps: int, batch: int = 8, seed: int = 0, *, out: str | Path | None = None,
            checkpoint_every: int = 0, log_every: int = 0, eval_n: int = 64, eval_seed: int | None = None,
            resume: bool = False, progress: bool = True) -> FinetuneResult:
        """Train until `steps` steps are done. Step s draws its latents, real batch and flips from
        (seed, s) alone, so a resumed run repeats an uninterrupted one.

        With `out`: OUT/generator.pt (own format) and OUT/resume.pt every `checkpoint_every` steps and
        at the end, each pair saved as one commit (`finetune_files.commit_checkpoint`), one OUT/metrics.jsonl
        line every `log_every` steps (and at steps 0 and `steps`) with
        the mean losses and, on latents 0..eval_n-1 of `eval_seed` (default seed + 1) against eval_n
        real images, the classifier's accuracy, AP and P(fake), and LPIPS to the original. `resume`
        continues from the last committed checkpoint, whenever the last run was killed: in fp32 on CPU it
        ends with the files of an uninterrupted run. A non-finite loss, or a total above max_loss, stops the
        run and returns the last checkpointed weights (the files keep them too) with the reason in `stopped`.
        """
        run = self._plan(steps, batch, seed, out, checkpoint_every, log_every, eval_n, eval_seed)
        self._open(run, resume)
        stopped = None
        bar = progress_bar(total=steps, initial=self.step, desc="finetune", unit="step",
                           disable=not progress or not distributed.is_main())
        with frozen(self.classifier, self.original), bar:
            if log_every and self.step == 0 and not run.history:
                run.log(self._log_record(eval_n, run.eval_seed, seed))  # the starting point: the original generator
            while self.step < steps and stopped is None:
                stopped = self._advance(run, bar)
        return self._finish(run, stopped)

    def _plan(self, steps: int, batch: int, seed: int, out: str | Path | None, checkpoint_every: int,
              log_every: int, eval_n: int, eval_seed: int | None) -> _Run:
        """Check the schedule against this finetuner and fix what the run records."""
        if steps < 0 or batch < 2 or seed < 0 or checkpoint_every < 0 or log_every < 0 or eval_n < 0:
            raise ValueError(f"expected steps >= 0, batch >= 2, seed >= 0 and non-negative intervals; got "
                             f"steps={steps}, batch={batch}, seed={seed}")
        _, rows = distributed.share_of(batch, "batch")  # a global batch the ranks cannot split: ValueError
        group = getattr(self.discriminator, "stddev_group", 1) or rows  # None (NVlabs): the whole batch
        if isinstance(self.discriminator, StyleGAN2Discriminator) and rows % min(group, rows):
            raise ValueError(f"a StyleGAN2 discriminator needs a batch (per process) that is a multiple of {group}, "
                             f"not {rows}")
        if self.ema_auto:
            self.ema_beta = default_ema_beta(steps)
        else:
            warn_slow_average(self.ema_beta, steps)
        return _Run(steps, batch, seed, Path(out) if out is not None else None, checkpoint_every, log_every,
                           eval_n, seed + 1 if eval_seed is None else eval_seed, self.settings(batch, seed))

    def _open(self, run: _Run, resume: bool) -> None:
        """Continue from OUT's last committed checkpoint when asked (its log lines kept), else start OUT afresh."""
        out = run.out
        if out is not None:  # rank 0 settles OUT, then every rank reads it
            found = distributed.run_on_main(ddp.settle, out, resume, self.step)
            if found is not None:
                run.history = self._resume(out, run.settings)
            if found == "resume.pt":
                self._checkpoint(out, run.settings)  # generator.pt rewritten from resume.pt: the two agree
        if self.step > run.steps:
            distributed.refuse(f"the run is already at step {self.step}, past the {run.steps} steps asked for")

    def _advance(self, run: _Run, bar: ProgressBar) -> str | None:
        """One step with its bookkeeping: losses summed for the log, log lines and checkpoints when due.
        Returns why the divergence guard stopped the run (the last good state restored), else None."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # style noise: each rank draws its own for its slice (rank 0 the single-process stream)
            torch.manual_seed(derive_seed(run.seed, NOISE_DRAWS, self.step) + distributed.rank())
            losses = self._train_step(run.batch, run.seed)
        stopped = divergence(losses, self.max_loss, self.step)
        if stopped is not None:
            run.log({"step": self.step + 1, "stopped": stopped, "restored_step": self._good["step"]})
            self._restore(self._good)
            return stopped
        self.step += 1
        for key, value in losses.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        bar.update(1)
        last = self.step == run.steps
        if last or (run.log_every and self.step % run.log_every == 0):
            record = self._log_record(run.eval_n if run.log_every else 0, run.eval_seed, run.seed)
            if run.log_every or run.out is not None:
                run.log(record)
            bar.set_postfix(loss_d=f"{record.get('loss_d', float('nan')):.3f}",
                            acc_fake=f"{record.get('acc_fake', float('nan')):.2f}", refresh=False)
        if last or (run.checkpoint_every and self.step % run.checkpoint_every == 0):
            self._checkpoint(run.out, run.settings)
        return None

    def _finish(self, run: _Run, stopped: str | None) -> FinetuneResult:
        distributed.barrier()  # rank 0 has committed the last checkpoint
        out = run.out
        if stopped is None and out is not None and not committed(out):
            self._checkpoint(out, run.settings)  # zero steps asked for: the file still holds the (unchanged) networks
        checkpoint = out / file_name(self.average) if out is not None and committed(out) else None
        return FinetuneResult(self.average, self.generator, self.discriminator, self.step, stopped, run.history,
                              checkpoint, run.settings)

