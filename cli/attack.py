"""Attack commands: exaggerate, finetune, retrain.

Registered on `cli.main`; each calls one study function of `analysis`.
"""
from __future__ import annotations

from typing import Any

import click

from patchscope.cli.common import (GENERATOR_HELP, config_layers, dry_run_option, exit_if_dry_run, lpips_options,
                                   overrides, own_generator_options, user_errors)
from patchscope.cli.group import main
from patchscope.common import config as configs


@main.command("exaggerate")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `exaggerate:` section, or the whole file).")
@click.option("--generator", help=f"Generator: {GENERATOR_HELP}; files: PGAN, StyleGAN, StyleGAN2 or Glow checkpoints.")
@own_generator_options
@click.option("--classifier", help="Classifier run directory or .safetensors file (see --which).")
@click.option("--out", help="Output folder; an existing one is refused unless --resume or --force.")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of a run directory.  [default: best]")
@click.option("--space", type=click.Choice(["auto", "z", "w"]),
              help="Latent space of the shift; auto = w for StyleGAN/StyleGAN2, z otherwise.  [default: auto]")
@click.option("--lam", type=click.FloatRange(0), help="λ of eq. 3: weight of LPIPS(G(z), G(z - w)).  [default: 1.0]")
@click.option("--steps", type=click.IntRange(0), help="Adam steps, each on a fresh latent batch.  [default: 500]")
@click.option("--batch-size", type=click.IntRange(1), help="Latents per step.  [default: 16]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate.  [default: 0.01]")
@click.option("--seed", type=click.IntRange(0), help="Training batches come from seeds derived from (seed, step).  [default: 0]")
@click.option("--eval-seed", type=click.IntRange(0),
              help="Held-out latents for metrics and the grid; refused if a training batch used it.  [default: seed + 1]")
@click.option("--eval-n", type=click.IntRange(1), help="Held-out latents scored per k.  [default: 256]")
@click.option("--eval-batch-size", type=click.IntRange(1), help="Latents per evaluation batch.  [default: 16]")
@click.option("--ks", help="Columns G(z - k*w), comma-separated; k > 0 is more fake.  [default: -2,-1,0,1,2]")
@click.option("--grid-rows", type=click.IntRange(0), help="Samples shown in grid.png; 0 = no grid.  [default: 6]")
@click.option("--aggregation", type=click.Choice(["after_softmax", "before_softmax", "vote"]),
              help="Image P(fake) reported in metrics and captions.  [default: after_softmax]")
@click.option("--load-size", type=click.IntRange(1), help="Classifier input: resize the generator output to this.  [default: as trained]")
@click.option("--crop-size", type=click.IntRange(1), help="Classifier input: centre crop.  [default: as trained]")
@lpips_options
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.  [default: auto]")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the classifier, the generator and LPIPS (uncompiled, after one warning, where the "
                   "compiler cannot run). Float rounding differs from uncompiled runs, so --resume keeps it as it "
                   "was.  [default: off]")
@click.option("--resume", is_flag=True, help="Keep the finished shift in --out (same settings) and score it again, e.g. with other --ks.")
@click.option("--force", is_flag=True, help="Fit the shift again in an existing --out.")
@dry_run_option
@user_errors
def exaggerate(config: str | None, ks: str | None, resume: bool, force: bool, **options: Any) -> None:
    """Exaggerate what a classifier detects: learn a latent shift w (eq. 3), show G(z - k*w).

    \b
    w minimises E_z[ L_fake(C(G(z - w))) + lam * LPIPS(G(z), G(z - w)) ] with Adam over fresh
    latent batches; generator output is resized to the classifier's input size on the device.
    Column k of the grid is G(z - k*w): k > 0 more fake, k < 0 less fake, k = 0 the original
    (framed); every tile is captioned with P(fake). OUT receives shift.pt + shift.json,
    metrics.json/.csv (per k, on held-out latents: mean P(fake), mean LPIPS to the original),
    metrics.jsonl (one line per step), grid.png and config.yaml.

    \b
    Example:
      patchscope exaggerate --generator weights/pgan-celebahq-256.pt --classifier runs/xb2 \\
          --out runs/xb2/exaggerate --lpips-weights weights/alexnet-owt-7be5be79.pth
    """
    from patchscope.analysis.shift_grid import ExaggerateConfig, parse_ks, run_exaggerate

    cli = {**overrides(options), **({"ks": parse_ks(ks)} if ks else {})}
    cfg = configs.resolve(ExaggerateConfig, config_layers(config, "exaggerate"), cli, source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_exaggerate(cfg, resume=resume, force=force)
    click.echo(_shift_table(summary))
    click.echo(f"results: {summary['out']}" + (f"   grid: {summary['grid']}" if summary["grid"] else ""))


def _shift_table(summary: dict[str, Any]) -> str:
    lines = [f"{'k':>6} {'P(fake)':>8} {'logit':>8} {'LPIPS':>8}   (G(z - k*w), {summary['space']} space, "
             f"held-out seed {summary['eval_seed']}; logit = mean log-odds of the samples' P(fake))"]
    for row in summary["rows"]:
        lpips = f"{row['lpips']:>8.4f}" if "lpips" in row else f"{'-':>8}"
        logit = f"{row['logit']:>8.3f}" if "logit" in row else f"{'-':>8}"
        k = f"{row['k']:+g}" if row["k"] else "0"
        lines.append(f"{k:>6} {row['p_fake']:>8.4f} {logit} {lpips}")
    return "\n".join(lines)


@main.command("finetune")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `finetune:` section, or the whole file).")
@click.option("--generator", help=f"Generator: {GENERATOR_HELP}; files: pytorch_GAN_zoo PGAN .pt, official TF PGAN or "
                                  "StyleGAN pickle (written back as their TF variables), or StyleGAN2 (rosinality .pt, "
                                  "NVlabs pickle). With a discriminator it keeps its GAN loss; without one, --anchor.")
@own_generator_options
@click.option("--classifier", help="Frozen classifier: run directory or .safetensors file (see --which).")
@click.option("--real", help="Real images the GAN keeps training on: a folder (train/ is used when present), or a manifest.")
@click.option("--out", help="Output folder; an existing one is refused unless --resume or --force.")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of a classifier run directory.  [default: best]")
@click.option("--real-split", help="Split folder of --real to train on.  [default: train when present]")
@click.option("--steps", type=click.IntRange(0), help="Finetuning steps (n-critic D updates + one G update each).  [default: 1000]")
@click.option("--batch-size", type=click.IntRange(2), help="Fakes and reals per step.  [default: 8]")
@click.option("--classifier-weight", type=click.FloatRange(0),
              help="Weight of L_real(G, C), the frozen classifier's loss towards 'real'; 0 = GAN loss only.  [default: 1.0]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate of G and D.  [default: 1e-3 PGAN and without a discriminator, 2e-3 StyleGAN2]")
@click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), help="Adam beta1.  [default: 0.0]")
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), help="Adam beta2.  [default: 0.99]")
@click.option("--n-critic", type=click.IntRange(1), help="Discriminator updates per generator update.  [default: 1]")
@click.option("--ema-beta", type=click.FloatRange(0, 1, max_open=True),
              help="Per-step decay of the generator's moving average, which is what is saved.  [default: half-life "
                   "10% of --steps: 0.5 ** (1 / (0.1 * steps)), clamped to [0.9, 0.999]]")
@click.option("--anchor", type=click.Choice(["lpips", "l2", "lpips+l2"]),
              help="Generators without a discriminator: keep G near the original G0 by LPIPS and/or L2 between G(z) "
                   "and G0(z).  [default: lpips]")
@click.option("--anchor-weight", type=click.FloatRange(0), help="Weight of --anchor beside the classifier loss.  [default: 1.0]")
@click.option("--lambda-gp", type=click.FloatRange(0), help="PGAN: WGAN-GP gradient penalty weight.  [default: 10]")
@click.option("--drift", type=click.FloatRange(0), help="PGAN: weight of D(real)^2.  [default: 0.001]")
@click.option("--r1-gamma", type=click.FloatRange(0), help="StyleGAN2: R1 penalty weight gamma.  [default: 10]")
@click.option("--r1-every", type=click.IntRange(1), help="StyleGAN2: R1 every k-th D step (lazy when > 1).  [default: 1]")
@click.option("--mirror/--no-mirror", default=None, help="Flip half the real images left-right.  [default: on]")
@click.option("--max-loss", type=click.FloatRange(0, min_open=True),
              help="Divergence guard: a D or G loss above this (or any non-finite loss) stops the run.  [default: 1e4]")
@click.option("--seed", type=click.IntRange(0), help="Every draw of step s derives from (seed, s).  [default: 0]")
@click.option("--checkpoint-every", type=click.IntRange(0), help="Save generator.pt and resume.pt every N steps (and at the end).  [default: 100]")
@click.option("--log-every", type=click.IntRange(0), help="One metrics.jsonl line every N steps; 0 = none.  [default: 50]")
@click.option("--eval-n", type=click.IntRange(1), help="Fresh samples and reals the classifier judges per log line.  [default: 64]")
@click.option("--eval-seed", type=click.IntRange(0), help="Held-out latents for the log, the table and the grid.  [default: seed + 1]")
@click.option("--compare-n", type=click.IntRange(1), help="Samples per generator in before_after.json.  [default: 256]")
@click.option("--grid-rows", type=click.IntRange(0), help="Latents shown in grid.png; 0 = no grid.  [default: 6]")
@click.option("--aggregation", type=click.Choice(["after_softmax", "before_softmax", "vote"]),
              help="Image P(fake) used for accuracy, AP and captions.  [default: after_softmax]")
@click.option("--load-size", type=click.IntRange(1), help="Classifier input: resize the generator output to this.  [default: as trained]")
@click.option("--crop-size", type=click.IntRange(1), help="Classifier input: centre crop.  [default: as trained]")
@lpips_options
@click.option("--cache-real/--no-cache-real", default=None, help="Keep decoded reals in memory.  [default: when they fit in 4 GiB]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable real images.  [default: skip]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.  [default: auto]")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the frozen classifier and the generator's forward of the generator step (not the "
                   "discriminator: its gradient penalty needs a double backward); uncompiled, after one warning, "
                   "where the compiler cannot run. --resume keeps it as it was.  [default: off]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from resume.pt (a finished run is re-scored; more --steps go on).")
@click.option("--force", is_flag=True, help="Start again in an existing --out.")
@dry_run_option
@user_errors
def finetune(config: str | None, resume: bool, force: bool, **options: Any) -> None:
    """Finetune a generator so a frozen classifier calls its samples real (eq. 4).

    \b
    The generator keeps training with its discriminator and its own GAN loss on the real
    images (PGAN: WGAN-GP + drift; StyleGAN2: logistic + R1), while the classifier's patch
    loss towards "real" on its samples is added with --classifier-weight; without a
    discriminator, --anchor keeps it near the original instead. The moving average of the
    generator is saved in the source's own format (OUT/generator.pt, readable wherever a
    generator is asked for; MODULE:CALLABLE: OUT/generator.safetensors, for --weights),
    with resume.pt every --checkpoint-every steps; a
    non-finite or exploding loss stops the run and keeps the last good checkpoint. OUT also
    receives metrics.jsonl, before_after.json/.csv (classifier accuracy, acc_fake, AP and
    P(fake) on original vs finetuned samples of the same held-out latents, LPIPS between
    them), grid.png (original | finetuned, captioned with P(fake)) and config.yaml.

    \b
    Example:
      patchscope finetune --generator weights/pgan-celebahq-256.pt --classifier runs/xb2 \\
          --real data/real --out runs/xb2/finetune --steps 2000 \\
          --lpips-weights weights/alexnet-owt-7be5be79.pth
    """
    from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune

    cfg = configs.resolve(FinetuneConfig, config_layers(config, "finetune"), overrides(options), source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_finetune(cfg, resume=resume, force=force)
    click.echo(_finetune_table(summary))
    if summary["stopped"]:
        click.echo(f"stopped early: {summary['stopped']}; kept the checkpoint of step {summary['steps']}", err=True)
    click.echo(f"results: {summary['out']}" + (f"   generator: {summary['generator']}" if summary["generator"] else "")
               + (f"   grid: {summary['grid']}" if summary["grid"] else ""))


def _finetune_table(summary: dict[str, Any]) -> str:
    lines = [f"{'generator':<10} {'acc':>6} {'acc_fake':>8} {'AP':>6} {'P(fake)':>8} {'LPIPS':>7}   "
             f"({summary['format']}, {summary['steps']} steps, held-out seed {summary['eval_seed']})"]
    for row in summary["rows"]:
        lpips = f"{row['lpips_to_original']:>7.4f}" if "lpips_to_original" in row else f"{'-':>7}"
        lines.append(f"{row['generator']:<10} {row['acc']:>6.3f} {row['acc_fake']:>8.3f} {row['ap']:>6.3f} "
                     f"{row['p_fake']:>8.4f} {lpips}")
    return "\n".join(lines)


@main.command("retrain")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `retrain:` section, or the whole file).")
@click.option("--classifier", help="The old classifier: run directory or .safetensors file (see --which).")
@click.option("--generator", help=f"The finetuned generator: {GENERATOR_HELP} with --weights generator.safetensors.")
@own_generator_options
@click.option("--out", help="Study folder; an existing one is refused unless --resume or --force.")
@click.option("--real", help="Real images with train/val/test.  [default: the old classifier's training reals]")
@click.option("--original-fakes",
              help="The original generator's fakes with train/val/test; their manifest.json fixes how the finetuned "
                   "generator is sampled.  [default: the old classifier's training fakes]")
@click.option("--train", type=click.IntRange(1), help="Finetuned fakes in train/.  [default: as the original set]")
@click.option("--val", type=click.IntRange(1), help="Finetuned fakes in val/.  [default: as the original set]")
@click.option("--test", type=click.IntRange(1), help="Finetuned fakes in test/.  [default: as the original set]")
@click.option("--seed", type=int, help="Sampling seed.  [default: the original set's, so the same latents]")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of both classifiers.  [default: best]")
@click.option("--aggregation", type=click.Choice(["after_softmax", "before_softmax", "vote"]),
              help="Image score behind accuracy.  [default: after_softmax]")
@click.option("-n", "--n", "n", type=click.IntRange(1),
              help="Most predictive patches kept per class and classifier.  [default: 100]")
@click.option("--face-parser", type=click.Path(dir_okay=False),
              help="BiSeNet weights (79999_iter.pth, published with zllrunning/face-parsing.PyTorch) for "
                   "face-part classes.  [default: none: flat/edge/texture classes from local gradients]")
@click.option("--patch-seed", type=click.IntRange(0), help="Seeds the random baseline patch of each image.  [default: 0]")
@click.option("--sample-batch-size", type=click.IntRange(1),
              help="Images generated per step; does not change pixels.  [default: 16]")
@click.option("--batch-size", type=click.IntRange(1), help="Images per scoring batch.  [default: 64]")
@click.option("--device", help="auto | cpu | cuda | cuda:N, for sampling, training and scoring.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="Scoring precision; training keeps the old run's setting.  [default: auto]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers when scoring.  [default: 0]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--resume", is_flag=True, help="Continue the study in --out: finished stages are reused.")
@click.option("--force", is_flag=True, help="Redo every stage in an existing --out.")
@dry_run_option
@user_errors
def retrain(config: str | None, train: int | None, val: int | None, test: int | None, resume: bool, force: bool,
            **options: Any) -> None:
    """Retrain on a finetuned generator; compare the old and the new classifier.

    \b
    The finetuned generator is sampled exactly as the original fakes were (their manifest.json:
    size, options, seeds, chunk), a new classifier is trained on those fakes and the same reals
    with the old classifier's training settings, and both classifiers are scored on the original
    and the finetuned test fakes. Both classifiers' most predictive patches on the finetuned
    fakes and the reals are labelled by a segmenter. OUT receives retrain/ (fakes, classifier,
    evaluations), patches/{old,new}/, comparison.json/.csv (the 2x2 metrics and the patch-class
    histograms), comparison.png and summary.txt.

    \b
    Example:
      patchscope retrain --classifier runs/xb2 --generator runs/finetune/generator.pt \\
          --out runs/xb2/retrain --face-parser weights/79999_iter.pth
    """
    from patchscope.analysis.residual import RetrainStudyConfig, run_retrain_study

    counts = {name: n for name, n in (("train", train), ("val", val), ("test", test)) if n is not None}
    cli = {**overrides(options), **({"counts": counts} if counts else {})}
    cfg = configs.resolve(RetrainStudyConfig, config_layers(config, "retrain"), cli, source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_retrain_study(cfg, resume=resume, force=force)
    click.echo(summary["summary"], nl=False)
    click.echo(f"results: {summary['out']}   figure: {summary['files']['comparison.png']}")
