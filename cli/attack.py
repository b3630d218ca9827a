"""Attack commands: exaggerate, finetune, retrain.

Registered on `cli.main`; each calls one study function of `analysis`.
"""
from __future__ import annotations

from typing import Any

import click

from cli import main
from cli.common import config_layers, overrides, user_errors
from forensics import config as configs


@main.command("exaggerate")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `exaggerate:` section, or the whole file).")
@click.option("--generator", help="Generator checkpoint (PGAN, StyleGAN, StyleGAN2 or Glow; any format load_generator reads).")
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
@click.option("--lpips-net", type=click.Choice(["alex", "vgg", "squeeze"]), help="LPIPS backbone.  [default: alex]")
@click.option("--lpips-weights", type=click.Path(dir_okay=False),
              help="torchvision weights of the LPIPS backbone (alexnet-owt-7be5be79.pth, vgg16-397923af.pth or "
                   "squeezenet1_1-b8a52dc0.pth).  [default: $TORCH_HOME/hub/checkpoints]")
@click.option("--lpips-random/--no-lpips-random", default=None,
              help="Random LPIPS backbone: smoke tests only, its distances are not perceptual.  [default: off]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.  [default: auto]")
@click.option("--resume", is_flag=True, help="Keep the finished shift in --out (same settings) and score it again, e.g. with other --ks.")
@click.option("--force", is_flag=True, help="Fit the shift again in an existing --out.")
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
    from analysis.shift_grid import ExaggerateConfig, parse_ks, run_exaggerate

    cli = {**overrides(options), **({"ks": parse_ks(ks)} if ks else {})}
    cfg = configs.resolve(ExaggerateConfig, config_layers(config, "exaggerate"), cli, source=config or "options")
    summary = run_exaggerate(cfg, resume=resume, force=force)
    click.echo(_shift_table(summary))
    click.echo(f"results: {summary['out']}" + (f"   grid: {summary['grid']}" if summary["grid"] else ""))


def _shift_table(summary: dict[str, Any]) -> str:
    lines = [f"{'k':>6} {'P(fake)':>8} {'LPIPS':>8}   (G(z - k*w), {summary['space']} space, "
             f"held-out seed {summary['eval_seed']})"]
    for row in summary["rows"]:
        lpips = f"{row['lpips']:>8.4f}" if "lpips" in row else f"{'-':>8}"
        k = f"{row['k']:+g}" if row["k"] else "0"
        lines.append(f"{k:>6} {row['p_fake']:>8.4f} {lpips}")
    return "\n".join(lines)


@main.command("retrain")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `retrain:` section, or the whole file).")
@click.option("--classifier", help="The old classifier: run directory or .safetensors file (see --which).")
@click.option("--generator", help="The finetuned generator checkpoint (any format load_generator reads).")
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
    from analysis.residual import RetrainStudyConfig, run_retrain_study

    counts = {name: n for name, n in (("train", train), ("val", val), ("test", test)) if n is not None}
    cli = {**overrides(options), **({"counts": counts} if counts else {})}
    cfg = configs.resolve(RetrainStudyConfig, config_layers(config, "retrain"), cli, source=config or "options")
    summary = run_retrain_study(cfg, resume=resume, force=force)
    click.echo(summary["summary"], nl=False)
    click.echo(f"results: {summary['out']}   figure: {summary['files']['comparison.png']}")
