"""The `patchscope` command line: a thin click layer over the library.

Each subcommand parses options (defaults < --config YAML < command line), calls one library
function and prints; user errors become one line on stderr and exit code 2.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click

from forensics import config as configs
from forensics.errors import InputError
from generators.errors import CheckpointError, DatasetError

USER_ERRORS = (InputError, CheckpointError, DatasetError)


def _user_errors(fn: Callable) -> Callable:
    """Turn a user error into one line on stderr and exit code 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run the same command (with --resume where it has one) to continue", err=True)
            sys.exit(130)
    return wrapper


def _overrides(kwargs: dict[str, Any], drop: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in drop and v is not None}


def _layers(config_path: str | None, section: str) -> dict[str, Any]:
    return configs.read_yaml(config_path, section) if config_path else {}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """patchscope: what makes fake face images detectable.

    \b
    Examples:
      patchscope demo --out runs/demo
      patchscope train --real data/real --fake data/fake --out runs/xb2 --model xception_block2
      patchscope eval runs/xb2 --test pgan=data/real,data/fake --test sg=data/real,data/sg
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `train:` section, or the whole file).")
@click.option("--real", help="Real images: a folder with train/ and val/, a flat folder, or a .txt/.csv manifest.")
@click.option("--fake", help="Fake images, same layouts.")
@click.option("--out", help="Run directory; an existing run is refused unless --resume.")
@click.option("--model", help="Patch classifier (see `patchscope models`).  [default: xception_block2]")
@click.option("--load-size", type=click.IntRange(1), help="Lanczos-resize the shorter side once, at load.  [default: 299]")
@click.option("--crop-size", type=click.IntRange(1), help="Random crop for training, centre crop for validation.  [default: 299]")
@click.option("--batch-size", type=click.IntRange(2), help="Images per step, half real and half fake.  [default: 32]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate.  [default: 0.001]")
@click.option("--max-epochs", type=click.IntRange(1), help="Hard limit on epochs.  [default: 1000]")
@click.option("--patience", type=click.IntRange(1),
              help="Stop after this many epochs without a strictly higher validation patch accuracy.  "
                   "[default: 50 for xception_block1, 20 for xception_block2, else 10]")
@click.option("--seed", type=int, help="Seeds initial weights, batch order and augmentation.  [default: 0]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.  [default: auto]")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout.  [default: on]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.  [default: off]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0 when cached, else 8]")
@click.option("--cache/--no-cache", default=None, help="Keep decoded images in memory.  [default: when they fit in 4 GiB]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--tensorboard/--no-tensorboard", default=None, help="Also log to TensorBoard.  [default: off]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@_user_errors
def train(config: str | None, resume: bool, **options: Any) -> None:
    """Train a patch classifier on real and fake images.

    \b
    Every output cell of the classifier judges one receptive-field patch; the loss is
    cross entropy on every patch (fake = 1). Validation patch accuracy is measured after
    each epoch: a strictly higher value saves best.safetensors, and training stops once
    --patience epochs pass without one, or at --max-epochs. last.safetensors and the
    resume state are saved every epoch; --resume continues with identical results.

    \b
    Example:
      patchscope train --real data/real --fake data/pgan --out runs/xb2 \\
          --model xception_block2 --load-size 128 --crop-size 128
    """
    from forensics.train import TrainConfig, fit

    cfg = configs.resolve(TrainConfig, _layers(config, "train"), _overrides(options), source=config or "options")
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
@click.option("--load-size", type=click.IntRange(1), help="[default: as trained]")
@click.option("--crop-size", type=click.IntRange(1), help="[default: as trained]")
@click.option("--batch-size", type=click.IntRange(1), help="[default: 64]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="[default: skip]")
@click.option("--force", is_flag=True, default=None, help="Replace an existing metrics.json (and robustness results).")
@click.option("--heatmaps", type=click.IntRange(0), default=0,
              help="Also write heatmap pages of the N easiest and N hardest test images per class "
                   "(OUT/heatmaps/NAME/heatmaps.html).  [default: 0 = none]")
@click.option("--perturb", multiple=True,
              help="Also score every test set under a test-time perturbation, KIND:LEVEL[,LEVEL...]: jpeg:95,75,50 "
                   "(quality) or blur:1,2 (Gaussian sigma, px); repeat for both kinds "
                   "(OUT/robustness/NAME/robustness.{csv,json,png}).  [default: none]")
@_user_errors
def evaluate(run: str, config: str | None, tests: tuple[str, ...], heatmaps: int, perturb: tuple[str, ...],
             **options: Any) -> None:
    """Score test sets with a trained classifier: AP, accuracy, ROC AUC, PR curve.

    \b
    Writes OUT/metrics.json (every test set, every aggregation), appends to
    OUT/metrics.csv, draws OUT/pr_curve.png and keeps per-image scores. With
    --perturb, each test set is also scored clean and at every perturbation
    level (Wang et al.'s robustness sweep: AP and accuracy against the level).

    \b
    Example:
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --test sg=data/real,data/sg
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --heatmaps 10
      patchscope eval runs/xb2 --test pgan=data/real,data/pgan --perturb jpeg:95,75,50,30 --perturb blur:1,2,3
    """
    from forensics.evaluate import EvalConfig, evaluate as run_eval
    from forensics.perturb import parse_perturbations

    perturbations = parse_perturbations(perturb)
    layers = _layers(config, "eval")
    cli = {**_overrides(options), "run": run, **({"tests": list(tests)} if tests else {})}
    cfg = configs.resolve(EvalConfig, layers, cli, source=config or "options")
    summary = run_eval(cfg)
    click.echo(_metrics_table(summary))
    click.echo(f"results: {summary['out']}")
    if heatmaps:
        from analysis.heatmaps import write_eval_heatmaps

        for name, written in write_eval_heatmaps(cfg, heatmaps).items():
            click.echo(f"heatmaps ({name}): {written['page']}")
    if perturbations:
        from analysis.robustness import evaluate_robustness_tests, format_robustness_table

        sweep = evaluate_robustness_tests(cfg, perturbations)
        for name, rows in sweep["results"].items():
            click.echo(f"robustness ({name}):\n{format_robustness_table(rows)}")
        click.echo(f"robustness results: {sweep['out']}")


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
@click.option("--load-size", type=click.IntRange(1), help="[default: as trained]")
@click.option("--crop-size", type=click.IntRange(1), help="[default: as trained]")
@click.option("--batch-size", type=click.IntRange(1), help="[default: 64]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="[default: skip]")
@click.option("--sheet-max", type=click.IntRange(1), help="Patches on each contact sheet.  [default: 225]")
@click.option("--crops/--no-crops", "save_crops", default=None, help="One PNG per top patch.  [default: on]")
@click.option("--force", is_flag=True, default=None, help="Replace an existing patches.json.")
@_user_errors
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
    from analysis.patches import PatchesConfig, run_patches

    cli = {**_overrides(options), "run": run}
    cfg = configs.resolve(PatchesConfig, _layers(config, "patches"), cli, source=config or "options")
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


@main.command("invert")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `invert:` section, or the whole file).")
@click.option("--generator", help="Generator checkpoint (PGAN, StyleGAN, StyleGAN2 or Glow; any format load_generator reads).")
@click.option("--images", help="Images to invert: a flat folder, a folder with splits (see --split), or a .txt/.csv manifest.")
@click.option("--out", help="Output folder; an existing one is refused unless --resume.")
@click.option("--split", help="Split folder of --images when it has train/val/test.")
@click.option("--space", type=click.Choice(["auto", "z", "w", "w+"]),
              help="Latent space searched; auto = w+ for StyleGAN/StyleGAN2, z otherwise.  [default: auto]")
@click.option("--steps", type=click.IntRange(0), help="Adam steps per image.  [default: 300]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate.  [default: 0.05]")
@click.option("--lambda-mse", type=click.FloatRange(0), help="Weight of the pixel MSE.  [default: 1.0]")
@click.option("--lambda-lpips", type=click.FloatRange(0), help="Weight of LPIPS; 0 = MSE only.  [default: 1.0]")
@click.option("--lpips-net", type=click.Choice(["alex", "vgg", "squeeze"]), help="LPIPS backbone.  [default: alex]")
@click.option("--lpips-weights", type=click.Path(dir_okay=False),
              help="torchvision weights of the LPIPS backbone (alexnet-owt-7be5be79.pth, vgg16-397923af.pth or "
                   "squeezenet1_1-b8a52dc0.pth).  [default: $TORCH_HOME/hub/checkpoints]")
@click.option("--lpips-random/--no-lpips-random", default=None,
              help="Random LPIPS backbone: smoke tests only, its distances are not perceptual.  [default: off]")
@click.option("--batch-size", type=click.IntRange(1), help="Images optimised together; results do not depend on it.  [default: 8]")
@click.option("--seed", type=int, help="z of image i starts at latent i of this seed's stream.  [default: 0]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--resume", is_flag=True, help="Continue the inversion in --out; finished images are kept.")
@_user_errors
def invert(config: str | None, resume: bool, **options: Any) -> None:
    """Project images into a generator's latent space (GAN inversion): reprojected fakes.

    \b
    Every image is resized (Lanczos) to the generator's resolution and its latent is found
    with Adam, minimising lambda-mse * MSE + lambda-lpips * LPIPS; each image keeps its best
    latent. OUT receives the reprojections as PNG under the images' own names, latents.pt
    ({name: latent}), metrics.json (per-image MSE and LPIPS) and config.yaml. Work is saved
    after every batch; --resume continues without redoing finished images.

    \b
    Example:
      patchscope invert --generator weights/stylegan2-ffhq-256.pt --images data/real/test \\
          --out data/sg2_reprojected --lpips-weights weights/alexnet-owt-7be5be79.pth
    """
    from attacks.invert import InvertConfig, invert_folder

    cfg = configs.resolve(InvertConfig, _layers(config, "invert"), _overrides(options), source=config or "options")
    summary = invert_folder(cfg, resume=resume)
    click.echo(json.dumps(summary, indent=2))


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
@_user_errors
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
    from analysis.spectra import compare_spectra

    result = compare_spectra(real, fake, out, progress=True, **options)
    summary = result["summary"]
    largest = summary["difference"]["largest"]
    click.echo(f"{'set':<6} {'n':>6} {'mean':>8} {'high band':>10}")
    for name in ("real", "fake"):
        click.echo(f"{name:<6} {result['n_' + name]:>6} {summary[name]['mean']:>8.4f} "
                   f"{summary[name]['high_band_mean']:>10.4f}")
    click.echo(f"largest difference {largest['value']:+.4f} at fx={largest['fx']:+.4f}, fy={largest['fy']:+.4f} cycles/px")
    click.echo(f"results: {result['out']}")


def _split_counts(train: int | None, val: int | None, test: int | None) -> dict[str, int]:
    return {name: n for name, n in (("train", train), ("val", val), ("test", test)) if n is not None}


@main.command()
@click.argument("generator", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Dataset folder: OUT/{train,val,test}/NNNNNN.png and OUT/manifest.json.")
@click.option("--train", type=click.IntRange(0), help="Images in train/ (seed SEED).")
@click.option("--val", type=click.IntRange(0), help="Images in val/ (seed SEED + 2).")
@click.option("--test", type=click.IntRange(0), help="Images in test/ (seed SEED + 1).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Latents of image n are row n of RandomState(split seed).randn; the paper used 0.")
@click.option("--size", type=click.IntRange(1), help="Lanczos-resize to SIZE x SIZE after rounding to uint8.  "
                                                     "[default: as generated]")
@click.option("--psi", type=float, help="Truncation toward the average w (style generators).  "
                                        "[default: the generator's: 0.7 StyleGAN, 1 StyleGAN2]")
@click.option("--truncation-cutoff", type=click.IntRange(1),
              help="Truncate only the first N layers.  [default: 8 StyleGAN, all StyleGAN2]")
@click.option("--noise-mode", type=click.Choice(["const", "random", "none"]),
              help="Per-layer noise of style generators; random is not reproducible.  [default: const]")
@click.option("--temperature", type=click.FloatRange(0), help="Glow sampling temperature.  [default: 0.7]")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Images generated per step before they are written.")
@click.option("--chunk", type=click.IntRange(1), default=8, show_default=True,
              help="Rows per network call. Kernels round differently for other batch shapes, so this "
                   "(not --batch-size) fixes the bytes; it is recorded with the seed.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="fp32 turns TF32 off on CUDA; bf16 autocast is faster and changes pixels.")
@click.option("--writers", type=click.IntRange(1), default=4, show_default=True, help="Threads encoding PNGs.")
@_user_errors
def sample(generator: str, out: str, train: int | None, val: int | None, test: int | None, psi: float | None,
           truncation_cutoff: int | None, noise_mode: str | None, temperature: float | None,
           **options: Any) -> None:
    """Sample a generator checkpoint into PNG train/val/test folders, as the paper did.

    \b
    Pixels are clip(rint((x + 1) / 2 * 255)), then Lanczos to --size. Image n of a split
    depends only on the seed, n and --chunk, never on --batch-size. Re-running the same
    command resumes: finished images are kept, missing ones made, --train/--val/--test may
    grow; other generator, options, seed or size are refused.

    \b
    Example:
      patchscope sample pgan_celebahq_1024.pkl --out data/pgan --size 128 \\
          --train 10000 --val 500 --test 500
    """
    from generators.sampling import sample_dataset

    counts = _split_counts(train, val, test)
    if not counts:
        raise click.UsageError("give at least one of --train, --val, --test")
    opts = {k: v for k, v in (("psi", psi), ("truncation_cutoff", truncation_cutoff), ("noise_mode", noise_mode),
                              ("temperature", temperature)) if v is not None}
    summary = sample_dataset(generator, out, counts, opts=opts, **options)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the prepared reals, with manifest.json.")
@click.option("--generator", type=click.Path(dir_okay=False),
              help="Checkpoint whose output resolution the reals are resized to.")
@click.option("--resolution", type=click.IntRange(1), help="That resolution, without loading a checkpoint.")
@click.option("--size", type=click.IntRange(1), help="Working size, as given to `sample --size`.  "
                                                     "[default: the resolution]")
@click.option("--crop", type=click.Choice(["center", "none"]), default="center", show_default=True,
              help="center: the largest centred square; none: squash the whole image.")
@click.option("--train", type=click.IntRange(0), help="Cap train/ of split folders, or deal this many flat images.")
@click.option("--val", type=click.IntRange(0), help="Same for val/.")
@click.option("--test", type=click.IntRange(0), help="Same for test/.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffles flat images before they are dealt.")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), default="skip", show_default=True,
              help="skip: count and name unreadable files in the log.")
@click.option("--workers", type=click.IntRange(1), default=4, show_default=True, help="Threads decoding and encoding.")
@_user_errors
def prepare(sources: tuple[str, ...], generator: str | None, resolution: int | None, train: int | None,
            val: int | None, test: int | None, **options: Any) -> None:
    """Pass real images through a generator's pre-processing, saved like its samples.

    \b
    Centre crop, Lanczos to the generator's resolution, uint8, then Lanczos to --size: the
    steps a sampled fake takes, so real and fake differ in content only, not in format
    (REFERENCE §7). SOURCES are images, .txt lists of paths, or folders; train/val/test
    subfolders are kept. 16-bit, grey, palette and RGBA inputs become 8-bit RGB.

    \b
    Example:
      patchscope prepare celebahq/ --generator pgan_celebahq_1024.pkl --size 128 --out data/real
    """
    from generators.prepare import generator_resolution, prepare_reals

    if (generator is None) == (resolution is None):
        raise click.UsageError("give exactly one of --generator and --resolution")
    resolution = resolution or generator_resolution(generator)
    summary = prepare_reals(list(sources), resolution=resolution, counts=_split_counts(train, val, test) or None,
                            **options)
    click.echo(json.dumps(summary, indent=2))


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
@_user_errors
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

    cli = {**_overrides(options), **({"ks": parse_ks(ks)} if ks else {})}
    cfg = configs.resolve(ExaggerateConfig, _layers(config, "exaggerate"), cli, source=config or "options")
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


@main.command()
def models() -> None:
    """List the patch classifiers with their receptive field and parameter count.

    \b
    Example:
      patchscope models
    """
    from forensics.models import build_model, count_parameters, model_names
    from forensics.receptive import receptive_field

    click.echo(f"{'model':<18} {'channels':>8} {'params':>9} {'receptive field':>16} {'map @299':>9}")
    for name in model_names():
        model = build_model(name)
        rf = receptive_field(model)
        click.echo(f"{name:<18} {model.feature_channels:>8} {count_parameters(model) / 1e6:>8.3f}M "
                   f"{rf.size:>13} px {model.output_size(299):>6}x{model.output_size(299)}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="Where the demo writes everything.")
@click.option("--quick", is_flag=True, help="A smaller run for tests (about a minute).")
@click.option("--force", is_flag=True, help="Redo every stage instead of reusing cached results.")
@click.option("--config", type=click.Path(dir_okay=False), help="Demo settings.  [default: configs/demo.yaml]")
@_user_errors
def demo(out: str, quick: bool, force: bool, config: str | None) -> None:
    """Run the built-in demo: real photographs, fakes, train, evaluate, print AP.

    \b
    Example:
      patchscope demo --out runs/demo
    """
    from analysis.demo import run_demo

    run_demo(out, quick=quick, force=force, config_path=config)


if __name__ == "__main__":
    main()
