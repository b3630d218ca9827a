"""Generator commands: sample, prepare, invert, train-gan.

Registered on `cli.main`; each calls one function of `generators` or `attacks`.
"""
from __future__ import annotations

import json
from typing import Any

import click

from patchscope.cli.common import (GENERATOR_HELP, config_layers, dry_run_option, exit_if_dry_run, lpips_options,
                                   overrides, own_generator_options, user_errors)
from patchscope.cli.group import main
from patchscope.common import config as configs


def _split_counts(train: int | None, val: int | None, test: int | None) -> dict[str, int]:
    return {name: n for name, n in (("train", train), ("val", val), ("test", test)) if n is not None}


@main.command()
@click.argument("generator", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Dataset folder: OUT/{train,val,test}/NNNNNN.png and OUT/manifest.json.")
@own_generator_options
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
@click.option("--compile/--no-compile", default=False, show_default=True,
              help="torch.compile the generator (uncompiled, after one warning, where the compiler cannot run). "
                   "Its kernels may flip a few pixels, so the manifest records whether images were rendered "
                   "compiled and adding to a folder rendered otherwise is refused.")
@click.option("--writers", type=click.IntRange(1), default=4, show_default=True, help="Threads encoding PNGs.")
@dry_run_option
@user_errors
def sample(generator: str, out: str, train: int | None, val: int | None, test: int | None, psi: float | None,
           truncation_cutoff: int | None, noise_mode: str | None, temperature: float | None,
           **options: Any) -> None:
    """Sample a generator (file, or MODULE:CALLABLE) into PNG train/val/test folders, as the paper did.

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
    from patchscope.generators.sampling import SampleConfig, sample_dataset

    counts = _split_counts(train, val, test)
    if not counts:
        raise click.UsageError("give at least one of --train, --val, --test")
    opts = {k: v for k, v in (("psi", psi), ("truncation_cutoff", truncation_cutoff), ("noise_mode", noise_mode),
                              ("temperature", temperature)) if v is not None}
    cfg = configs.resolve(SampleConfig, {"generator": generator, "out": out, "counts": counts, "opts": opts},
                          options, source="options")
    exit_if_dry_run(cfg)
    summary = sample_dataset(cfg)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the prepared reals, with manifest.json.")
@click.option("--generator", help=f"Generator whose output resolution the reals are resized to: {GENERATOR_HELP}.")
@click.option("--resolution", type=click.IntRange(1), help="That resolution, without loading a checkpoint.")
@click.option("--size", type=click.IntRange(1), help="Working size, as given to `sample --size`.  "
                                                     "[default: the resolution]")
@click.option("--crop", type=click.Choice(["center", "none"]), default="center", show_default=True,
              help="center: the largest centred square; none: squash the whole image.")
@click.option("--random-crops", type=click.IntRange(1),
              help="Instead of one image per photo, N random crops of each (the demo's recipe); "
                   "photos, not crops, are dealt to the splits.")
@click.option("--crop-size", type=click.IntRange(1),
              help="With --random-crops: crop side before the resizes.  [default: the resolution]")
@click.option("--crop-scale", "max_scale", type=click.FloatRange(1),
              help="With --random-crops: each crop takes a random side from S to this x S px (S = --crop-size), "
                   "then is resized to S; 1 = exactly S px.  [default: 3, the demo's]")
@click.option("--train", type=click.IntRange(0), help="Cap train/ of split folders, or deal this many flat images "
                                                      "(photos with --random-crops).")
@click.option("--val", type=click.IntRange(0), help="Same for val/.")
@click.option("--test", type=click.IntRange(0), help="Same for test/.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Shuffles flat images before they are dealt; draws the random crops.")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), default="skip", show_default=True,
              help="skip: count and name unreadable files in the log.")
@click.option("--workers", type=click.IntRange(1), default=4, show_default=True, help="Threads decoding and encoding.")
@dry_run_option
@user_errors
def prepare(sources: tuple[str, ...], generator: str | None, resolution: int | None, train: int | None,
            val: int | None, test: int | None, random_crops: int | None, crop_size: int | None,
            max_scale: float | None, **options: Any) -> None:
    """Pass real images through a generator's pre-processing, saved like its samples.

    \b
    Centre crop, Lanczos to the generator's resolution, uint8, then Lanczos to --size: the
    steps a sampled fake takes, so real and fake differ in content only, not in format
    (REFERENCE §7). SOURCES are images, .txt lists of paths, or folders; train/val/test
    subfolders are kept. 16-bit, grey, palette and RGBA inputs become 8-bit RGB.

    \b
    --random-crops N makes many images from a few photos: N random squares of each
    (side S to --crop-scale x S, Lanczos to S = --crop-size), mirrored half the time, then
    the same resizes; --train/--val/--test then deal photos, so no photo is in two splits.
    manifest.json records each crop's photo and box.

    \b
    Example:
      patchscope prepare celebahq/ --generator pgan_celebahq_1024.pkl --size 128 --out data/real
      patchscope prepare photos/ --resolution 32 --random-crops 400 --crop-size 32 \\
          --train 9 --val 2 --test 2 --out data/crops
    """
    from patchscope.generators.prepare import generator_resolution, prepare_reals
    from patchscope.common.crops import DEFAULT_MAX_SCALE
    from patchscope.generators.random_crops import prepare_random_crops

    if (generator is None) == (resolution is None):
        raise click.UsageError("give exactly one of --generator and --resolution")
    if random_crops is None and (crop_size is not None or max_scale is not None):
        raise click.UsageError("--crop-size and --crop-scale go with --random-crops N")
    if random_crops is not None and options["crop"] != "center":
        raise click.UsageError("--crop does not apply with --random-crops (the crops are random squares)")
    resolution = resolution or generator_resolution(generator)
    counts = _split_counts(train, val, test) or None
    crops = {} if random_crops is None else {"random_crops": random_crops, "crop_size": crop_size or resolution,
                                             "max_scale": max_scale or DEFAULT_MAX_SCALE}
    if crops:
        options.pop("crop")  # refused above unless left at its default
    exit_if_dry_run({"sources": list(sources), "generator": generator, "resolution": resolution,
                     "counts": counts, **crops, **options})
    if random_crops is None:
        summary = prepare_reals(list(sources), resolution=resolution, counts=counts, **options)
    else:
        summary = prepare_random_crops(list(sources), resolution=resolution, counts=counts, **crops, **options)
    click.echo(json.dumps(summary, indent=2))


@main.command("invert")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `invert:` section, or the whole file).")
@click.option("--generator", help=f"Generator: {GENERATOR_HELP}; files: PGAN, StyleGAN, StyleGAN2 or Glow checkpoints.")
@own_generator_options
@click.option("--images", help="Images to invert: a flat folder, a folder with splits (see --split), or a .txt/.csv manifest.")
@click.option("--out", help="Output folder; an existing one is refused unless --resume.")
@click.option("--split", help="Split folder of --images when it has train/val/test.")
@click.option("--space", type=click.Choice(["auto", "z", "w", "w+"]),
              help="Latent space searched; auto = w+ for StyleGAN/StyleGAN2, z otherwise.  [default: auto]")
@click.option("--steps", type=click.IntRange(0), help="Adam steps per image.  [default: 300]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate.  [default: 0.05]")
@click.option("--lambda-mse", type=click.FloatRange(0), help="Weight of the pixel MSE.  [default: 1.0]")
@click.option("--lambda-lpips", type=click.FloatRange(0), help="Weight of LPIPS; 0 = MSE only.  [default: 1.0]")
@lpips_options
@click.option("--batch-size", type=click.IntRange(1), help="Images optimised together; results do not depend on it.  [default: 8]")
@click.option("--seed", type=int, help="z of image i starts at latent i of this seed's stream.  [default: 0]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--resume", is_flag=True, help="Continue the inversion in --out; finished images are kept.")
@dry_run_option
@user_errors
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
    from patchscope.attacks.invert import InvertConfig, invert_folder

    cfg = configs.resolve(InvertConfig, config_layers(config, "invert"), overrides(options), source=config or "options")
    exit_if_dry_run(cfg)
    summary = invert_folder(cfg, resume=resume)
    click.echo(json.dumps(summary, indent=2))


@main.command("train-gan")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML settings (its `train_gan:` section, or the whole file), e.g. configs/train_gan_tiny.yaml.")
@click.option("--images", help="Folder of real PNG/JPEG images, searched recursively.")
@click.option("--out", help="Run directory; an existing run is refused unless --resume.")
@click.option("--resolution", type=click.IntRange(4), help="Final resolution, a power of two; growing starts at 4 px.  [default: 32]")
@click.option("--latent-dim", type=click.IntRange(1), help="Latent vector size.  [default: 128]")
@click.option("--fmap-base", type=click.IntRange(1), help="Channels at r px are min(fmap_max, fmap_base / r).  [default: 512]")
@click.option("--fmap-max", type=click.IntRange(1), help="(16384 and 512 give pytorch_GAN_zoo's celebAHQ depths).  [default: 64]")
@click.option("--batch-size", type=click.IntRange(2), help="Images per step.  [default: 16]")
@click.option("--scale-images", type=click.IntRange(1), help="Real images shown at each scale (kimg x 1000).  [default: 20000]")
@click.option("--fade-images", type=click.IntRange(0), help="The first this many of each new scale fade it in.  [default: 4000]")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Adam learning rate, both networks.  [default: 0.001]")
@click.option("--beta1", type=click.FloatRange(0, 1, max_open=True), help="Adam beta1.  [default: 0.0]")
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True), help="Adam beta2.  [default: 0.99]")
@click.option("--lambda-gp", type=click.FloatRange(0), help="WGAN-GP gradient penalty weight.  [default: 10.0]")
@click.option("--gp-every", type=click.IntRange(1), help="Compute the penalty every N steps with N times the weight.  [default: 4]")
@click.option("--drift", type=click.FloatRange(0), help="Weight of D(real)^2.  [default: 0.001]")
@click.option("--ema-half-life", type=click.IntRange(0), help="Images over which the averaged generator's memory halves.  [default: 1000]")
@click.option("--mirror/--no-mirror", default=None, help="Flip half the real images left-right.  [default: on]")
@click.option("--seed", type=int, help="Seeds weights, batch order and every random draw.  [default: 0]")
@click.option("--snapshot-images", type=click.IntRange(0), help="Save generator.pt and resume.pt this often, and at each scale's end.  [default: 10000]")
@click.option("--log-images", type=click.IntRange(1), help="One metrics.jsonl line per this many images.  [default: 2000]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout.  [default: on]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last snapshot.")
@dry_run_option
@user_errors
def train_gan(config: str | None, resume: bool, **options: Any) -> None:
    """Train a small progressive GAN on a folder of images, saved in the pytorch_GAN_zoo format.

    \b
    Growing starts at 4 px and doubles up to --resolution; each scale sees --scale-images
    real images, the first --fade-images of them fading the new scale in. WGAN-GP
    (lambda 10) with drift 0.001, Adam lr 1e-3 betas (0, 0.99), equalized learning rate,
    minibatch stddev, and an averaged generator (avgG), as Karras et al. OUT/generator.pt
    (avgG, netG, netD) is read by every command that takes a generator; OUT/generator_{r}px.pt
    keeps each scale's end. Snapshots can be resumed with --resume, with identical results on CPU.

    \b
    Example:
      patchscope train-gan --images data/real/train --out runs/pgan32 --config configs/train_gan_tiny.yaml
    """
    from patchscope.generators.training.trainer import GANTrainConfig, train_gan as run_training

    cfg = configs.resolve(GANTrainConfig, config_layers(config, "train_gan"), overrides(options), source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_training(cfg, resume=resume)
    click.echo(json.dumps(summary, indent=2))
