"""Classifier commands: train, eval, patches, spectra, models.

Registered on `cli.main`; each calls one function of `forensics` or `analysis`.
"""
from __future__ import annotations

import json
from typing import Any

import click

from patchscope.cli.common import (config_layers, dry_run_option, exit_if_dry_run, overrides, scoring_options,
                                   user_errors)
from patchscope.cli.group import main
from patchscope.common import config as configs

CROP_ON_HELP = ("Where each image is cropped, flipped and scaled to [-1, 1]: host (per image, in the loader) or "
                "device (per batch where the model runs: the loader sends uncropped uint8 images, not float32 "
                "crops). The same inputs, bit for bit, either way; device needs images of one shape before "
                "the crop and falls back to host otherwise.  [default: auto = device on CUDA when the images "
                "share one shape, else host]")
STORE_HELP = ("Image store folder: images are decoded and resized once into memory-mapped files there and read "
              "back by later runs; rebuilt when a file or the load size changes.  [default: none, decode each run]")


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `train:` section, or the whole file).")
@click.option("--real", help="Real images: a folder with train/ and val/, a flat folder, or a .txt/.csv manifest.")
@click.option("--fake", help="Fake images, same layouts.")
@click.option("--out", help="Run directory; an existing run is refused unless --resume.")
@click.option("--model", help="Patch classifier or full-image baseline (see `patchscope models`).  [default: xception_block2]")
@click.option("--load-size", type=click.IntRange(1), help="Lanczos-resize the shorter side once, at load.  [default: 299]")
@click.option("--crop-size", type=click.IntRange(1), help="Random crop for training, centre crop for validation.  [default: 299]")
@click.option("--batch-size", type=click.IntRange(2), help="Images per step, half real and half fake.  [default: 32]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate.  [default: 0.001]")
@click.option("--max-epochs", type=click.IntRange(1), help="Hard limit on epochs.  [default: 1000]")
@click.option("--patience", type=click.IntRange(1),
              help="Stop after this many epochs without a strictly higher validation patch accuracy.  "
                   "[default: 50 for xception_block1, 20 for xception_block2, else 10]")
@click.option("--early-stopping", type=click.Choice(["patience", "public"]),
              help="patience: stop after --patience epochs without a strictly higher validation patch accuracy; "
                   "public (the public patch-forensics code's rule): stop once more than 5 x --patience epochs "
                   "passed since the best, or one epoch after the validation patch accuracy reached 1.0. "
                   "--max-epochs is a hard limit under both.  [default: patience]")
@click.option("--seed", type=int, help="Seeds initial weights, batch order and augmentation.  [default: 0]")
@click.option("--init", type=click.Choice(["xavier", "kaiming"]),
              help="Initial weights. xavier (the public code's): conv and linear weights xavier-normal with gain "
                   "0.02, their biases 0, BatchNorm weights ~ N(1, 0.02) and biases 0; kaiming: PyTorch's "
                   "default layer init (kaiming-uniform weights, a=sqrt(5), uniform biases; BatchNorm weight 1, "
                   "bias 0).  [default: xavier]")
@click.option("--init-weights", type=click.Path(dir_okay=False),
              help="Start the backbone from this weight file (a torchvision .pth state dict or .safetensors), matched "
                   "by key and shape; the head starts fresh.  [default: none, from scratch]")
@click.option("--augment", type=click.Choice(["none", "blur_jpeg_0.1", "blur_jpeg_0.5"]),
              help="Wang et al.'s Blur+JPEG (p): each training image blurred (sigma ~ U[0,3]) with probability p, "
                   "then JPEG-compressed (quality ~ U{30..100}) with probability p.  [default: none]")
@click.option("--blur-prob", type=click.FloatRange(0, 1), help="Blur probability, replacing the --augment preset's.")
@click.option("--jpeg-prob", type=click.FloatRange(0, 1), help="JPEG probability, replacing the --augment preset's.")
@click.option("--random-resized-crop/--no-random-resized-crop", default=None,
              help="Train on a random area (8-100%) and aspect (3/4-4/3) resized to --crop-size.  [default: off]")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips of training images.  [default: on]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.  [default: auto]")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout.  [default: on]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.  [default: off]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0 when cached, else 8]")
@click.option("--crop-on", type=click.Choice(["auto", "host", "device"]), help=CROP_ON_HELP)
@click.option("--cache/--no-cache", default=None, help="Keep decoded images in memory.  [default: when they fit in 4 GiB]")
@click.option("--store", type=click.Path(file_okay=False), help=STORE_HELP)
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--tensorboard/--no-tensorboard", default=None, help="Also log to TensorBoard.  [default: off]")
@click.option("--sync-bn/--no-sync-bn", default=None,
              help="Under torchrun: BatchNorm statistics of the whole global batch (SyncBatchNorm) rather than of "
                   "each process's share; training then matches one process.  [default: off]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@dry_run_option
@user_errors
def train(config: str | None, resume: bool, **options: Any) -> None:
    """Train a patch classifier (or a full-image baseline) on real and fake images.

    \b
    Every output cell of the classifier judges one receptive-field patch; the loss is
    cross entropy on every patch (fake = 1; MesoInception-4: squared error, as its
    authors trained it). Validation patch accuracy is measured after each
    epoch: a strictly higher value saves best.safetensors. Training stops as
    --early-stopping says (patience: after --patience epochs without one;
    public: the public code's rule), or at --max-epochs. last.safetensors and
    the resume state are saved every epoch; --resume continues with identical
    results (and may raise --max-epochs or --patience or change --early-stopping).

    \b
    Example:
      patchscope train --real data/real --fake data/pgan --out runs/xb2 \\
          --model xception_block2 --load-size 128 --crop-size 128
      patchscope train --real data/real --fake data/pgan --out runs/wang \\
          --model wang2020_resnet50 --init-weights resnet50-0676ba61.pth \\
          --augment blur_jpeg_0.5 --load-size 256 --crop-size 224 --lr 1e-4
    """
    from patchscope.forensics.train import TrainConfig, fit

    cfg = configs.resolve(TrainConfig, config_layers(config, "train"), overrides(options), source=config or "options")
    exit_if_dry_run(cfg)
    summary = fit(cfg, resume=resume)
    click.echo(json.dumps(summary, indent=2))


@main.command("eval")
@click.argument("run")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `eval:` section, or the whole file).")
@click.option("--test", "tests", multiple=True, help="NAME=REAL_DIR,FAKE_DIR; repeat for several test sets.")
@click.option("--out", help="Results folder.  [default: RUN/eval]")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of a run directory.  [default: best]")
@click.option("--split", help="Split folder used when a source has splits.  [default: test]")
@click.option("--aggregation", type=click.Choice(["after_softmax", "before_softmax", "vote"]),
              help="Image score for accuracy and the PR curve (metrics.json holds all three).  [default: after_softmax]")
@scoring_options
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the classifier that scores the test sets (uncompiled, after one warning, where "
                   "the compiler cannot run). Scores may differ from uncompiled ones by float rounding.  "
                   "[default: off]")
@click.option("--crop-on", type=click.Choice(["auto", "host", "device"]), help=CROP_ON_HELP)
@click.option("--store", type=click.Path(file_okay=False), help=STORE_HELP)
@click.option("--force", is_flag=True, default=None, help="Replace an existing metrics.json (and robustness results).")
@click.option("--heatmaps", type=click.IntRange(0),
              help="Also write heatmap pages of the N easiest and N hardest test images per class "
                   "(OUT/heatmaps/NAME/heatmaps.html).  [default: 0 = none]")
@click.option("--perturb", multiple=True,
              help="Also score every test set under a test-time perturbation, KIND:LEVEL[,LEVEL...]: jpeg:95,75,50 "
                   "(quality) or blur:1,2 (Gaussian sigma, px); repeat for both kinds; replaces the config's "
                   "list (OUT/robustness/NAME/robustness.{csv,json,png}).  [default: none]")
@dry_run_option
@user_errors
def evaluate(run: str, config: str | None, tests: tuple[str, ...], perturb: tuple[str, ...],
             **options: Any) -> None:
    """Score test sets with a trained classifier: AP, accuracy, ROC AUC, PR curve.

    \b
    Writes OUT/metrics.json (every test set, every aggregation), appends to
    OUT/metrics.csv, draws OUT/pr_curve.png and keeps per-image scores. With
    --perturb, each test set is also scored clean and at every perturbation
    level (Wang et al.'s robustness sweep: AP and accuracy against the level).
    --heatmaps and --perturb can also be set as heatmaps: and perturb: in the
    --config file, and are saved in OUT/config.yaml with the other settings.

    \b
    Example:
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --test sg=data/real,data/sg
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --heatmaps 10
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --perturb jpeg:95,75,50,30 --perturb blur:1,2,3
    """
    from patchscope.analysis.evaluation import run_eval
    from patchscope.analysis.robustness import format_robustness_table
    from patchscope.forensics.evaluate import EvalConfig

    layers = config_layers(config, "eval")
    cli = {**overrides(options), "run": run, **({"tests": list(tests)} if tests else {}),
           **({"perturb": list(perturb)} if perturb else {})}
    cfg = configs.resolve(EvalConfig, layers, cli, source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_eval(cfg)
    click.echo(_metrics_table(summary))
    click.echo(f"results: {summary['out']}")
    for name, written in summary["heatmaps"].items():
        click.echo(f"heatmaps ({name}): {written['page']}")
    if summary["robustness"]:
        for name, rows in summary["robustness"]["results"].items():
            click.echo(f"robustness ({name}):\n{format_robustness_table(rows)}")
        click.echo(f"robustness results: {summary['robustness']['out']}")


def _metrics_table(summary: dict[str, Any]) -> str:
    mode = summary["aggregation"]
    lines = [f"{'test set':<16} {'AP':>7} {'AP real':>8} {'acc':>7} {'acc real':>9} {'acc fake':>9} {'n':>6}"]
    for name, per_mode in summary["results"].items():
        m = per_mode[mode]
        lines.append(f"{name:<16} {m['ap']:>7.4f} {m['ap_real']:>8.4f} {m['acc']:>7.4f} "
                     f"{m['acc_real']:>9.4f} {m['acc_fake']:>9.4f} {m['n']:>6}")
    return "\n".join(lines)


@main.command()
@click.argument("run")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `patches:` section, or the whole file).")
@click.option("--real", help="Real images: a folder with split subfolders, a flat folder, or a .txt/.csv manifest.")
@click.option("--fake", help="Fake images, same layouts.")
@click.option("--out", help="Results folder.  [default: RUN/patches]")
@click.option("--split", help="Split folder used when a source has splits.  [default: test]")
@click.option("-n", "--n", "n", type=click.IntRange(1),
              help="Images kept, one patch each: per class, or overall with --overall.  [default: 100]")
@click.option("--per-class/--overall", default=None,
              help="Top N reals and top N fakes, or the top N images of both together.  [default: per class]")
@click.option("--face-parser", type=click.Path(dir_okay=False),
              help="BiSeNet weights (79999_iter.pth, published with zllrunning/face-parsing.PyTorch) for "
                   "face-part classes.  [default: none: flat/edge/texture classes from local gradients]")
@click.option("--seed", type=click.IntRange(0), help="Seeds the random baseline patch of each image.  [default: 0]")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of a run directory.  [default: best]")
@scoring_options
@click.option("--sheet-max", type=click.IntRange(1), help="Patches on each contact sheet.  [default: 225]")
@click.option("--crops/--no-crops", "save_crops", default=None, help="One PNG per top patch.  [default: on]")
@click.option("--force", is_flag=True, default=None, help="Replace an existing patches.json.")
@dry_run_option
@user_errors
def patches(run: str, config: str | None, **options: Any) -> None:
    """Find each image's most predictive patch and what it shows.

    \b
    For every image, the output cell most sure of the image's true class is mapped to
    its receptive-field box; the N surest images are kept (one patch each). A segmenter
    labels each patch with the class covering most of it, and one random patch per kept
    image gives the baseline. Writes OUT/patches.json (cells, boxes, classes),
    OUT/crops/, OUT/sheet_{real,fake}.png and OUT/histogram_{real,fake}.png/.json.

    \b
    Example:
      patchscope patches runs/xb2 --real data/real --fake data/pgan -n 1000 \\
          --face-parser weights/79999_iter.pth
    """
    from patchscope.analysis.patches import PatchesConfig, run_patches

    cli = {**overrides(options), "run": run}
    cfg = configs.resolve(PatchesConfig, config_layers(config, "patches"), cli, source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_patches(**configs.to_dict(cfg))
    click.echo(_histogram_table(summary))
    click.echo(f"results: {summary['out']}")


def _histogram_table(summary: dict[str, Any]) -> str:
    names = summary["histograms"]
    lines = [f"{'class':<12} " + " ".join(f"{name + ' top':>10} {name + ' rand':>10}" for name in names)]
    for cls in summary["classes"]:
        cells = [f"{h['top']['fractions'][cls]:>10.3f} {h['baseline']['fractions'][cls]:>10.3f}"
                 for h in names.values()]
        lines.append(f"{cls:<12} " + " ".join(cells))
    return "\n".join(lines)


@main.command()
@click.option("--real", required=True, help="Real images: a flat folder, a folder with train/val/test, or a .txt/.csv manifest.")
@click.option("--fake", required=True, help="Fake images, same layouts.")
@click.option("--out", required=True, help="Folder for spectra.png, spectrum_{real,fake,diff}.npy and spectra.json.")
@click.option("--split", default="test", show_default=True, help="Split folder used when a source has splits.")
@click.option("--size", type=click.IntRange(3), help="Side of the square every image is brought to.  [default: shorter side of the first real image]")
@click.option("--fit", type=click.Choice(["crop", "resize"]), default="crop", show_default=True,
              help="crop: centre crop; resize: Lanczos-resize the shorter side to --size, then centre crop.")
@click.option("--max-images", type=click.IntRange(1), default=2000, show_default=True,
              help="Images averaged per set; larger sets are subsampled evenly.")
@click.option("--color", type=click.Choice(["gray", "mean"]), default="gray", show_default=True,
              help="gray: filter the luma; mean: filter each channel and average their spectra.")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), default="skip", show_default=True,
              help="Unreadable images.")
@click.option("--force", is_flag=True, help="Replace an existing spectra.json in --out.")
@dry_run_option(arguments=True)
@user_errors
def spectra(real: str, fake: str, out: str, **options: Any) -> None:
    """Average high-pass spectra of a real and a fake set, and their difference.

    \b
    Each image minus its 3x3 median-filtered version is Fourier transformed; the log
    magnitudes, DC at the centre, are averaged over the set (Wang et al.). Periodic
    traces of a generator's upsampling show as bright spots away from the centre.
    Writes OUT/spectra.png (real, fake, fake minus real), the three arrays as .npy,
    and OUT/spectra.json with summary numbers.

    \b
    Example:
      patchscope spectra --real data/real --fake data/pgan --out runs/spectra/pgan --size 128
    """
    from patchscope.analysis.spectra import compare_spectra

    result = compare_spectra(real, fake, out, progress=True, **options)
    summary = result["summary"]
    largest = summary["difference"]["largest"]
    click.echo(f"{'set':<6} {'n':>6} {'mean':>8} {'high band':>10}")
    for name in ("real", "fake"):
        click.echo(f"{name:<6} {result['n_' + name]:>6} {summary[name]['mean']:>8.4f} "
                   f"{summary[name]['high_band_mean']:>10.4f}")
    click.echo(f"largest difference {largest['value']:+.4f} at fx={largest['fx']:+.4f}, fy={largest['fy']:+.4f} cycles/px")
    click.echo(f"results: {result['out']}")


@main.command()
@dry_run_option(arguments=True)
def models() -> None:
    """List the classifiers with their receptive field, parameter count and training loss.

    \b
    Patch classifiers give a map of patch logits; the full-image baselines (resnet18,
    resnet50, xception, mesoinception4, wang2020_resnet50) a 1x1 map that sees the
    whole image. Loss: ce = cross entropy, mse = squared error of P(fake).

    \b
    Example:
      patchscope models
    """
    import torch

    from patchscope.forensics.models import build_model, count_parameters, model_names
    from patchscope.forensics.receptive import receptive_field

    click.echo(f"{'model':<18} {'channels':>8} {'params':>9} {'receptive field':>16} {'map @299':>9} {'loss':>5}")
    for name in model_names():
        with torch.device("meta"):  # shapes and counts only: nothing allocated or initialised
            model = build_model(name)
        field = "whole image" if model.whole_image else f"{receptive_field(model).size} px"
        click.echo(f"{name:<18} {model.feature_channels:>8} {count_parameters(model) / 1e6:>8.3f}M "
                   f"{field:>16} {model.output_size(299):>6}x{model.output_size(299)} {model.loss:>5}")


@main.command()
@click.argument("run_dir")
@click.option("--out", type=click.Path(),
              help="Where to write the page: an .html file, or a folder for report.html.  [default: RUN_DIR/report.html]")
@click.option("--title", help="Page title.  [default: patchscope report: NAME OF RUN_DIR]")
@dry_run_option(arguments=True)
@user_errors
def report(run_dir: str, out: str | None, title: str | None) -> None:
    """Write one self-contained HTML page of everything a run directory holds.

    \b
    RUN_DIR and its subfolders are searched for what the stages write: training
    log and checkpoints, eval metrics and PR curves, robustness sweeps, heatmaps,
    most predictive patches, spectra, exaggeration, finetuning and retraining.
    Each folder found becomes a section (figures, tables, settings) in pipeline
    order. Images are embedded, so the page opens anywhere without other files,
    network or scripts. The page is a view of the results: writing it again replaces it.

    \b
    Example:
      patchscope report runs/demo
      patchscope report runs/xb2 --out reports/xb2.html --title "xception_block2 on PGAN"
    """
    from patchscope.analysis.report.build import write_report

    path = write_report(run_dir, out=out, title=title)
    click.echo(f"report: {path}")
