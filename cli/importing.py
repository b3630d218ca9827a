"""Import command: import-checkpoint (the authors' released patch-forensics classifiers as patchscope runs).

Registered on `cli.main`; calls `forensics.import_public`.
"""
from __future__ import annotations

from typing import Any

import click

from patchscope.cli.common import config_layers, dry_run_option, exit_if_dry_run, overrides, user_errors
from patchscope.cli.group import main
from patchscope.common import config as configs


@main.command("import-checkpoint")
@click.argument("file")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML settings (its `import_checkpoint:` section, or the whole file).")
@click.option("--model", help="patchscope model to load it into, or auto: the one model its key names and shapes "
                              "fit.  [default: auto]")
@click.option("--out", help="Run folder to write (config.yaml, best.safetensors, best.json).")
@click.option("--load-size", type=click.IntRange(1), help="Load size the run scores images at.  [default: 299]")
@click.option("--crop-size", type=click.IntRange(1), help="Centre crop the run scores images at.  [default: 299]")
@click.option("--fake-class-id", type=click.IntRange(0, 1),
              help="The checkpoint's fake class (its opt.yml fake_class_id); 0 swaps the two output classes "
                   "into patchscope's fake = 1.  [default: 0, the public code's]")
@click.option("--force", is_flag=True, help="Replace an earlier import with other settings in --out.")
@dry_run_option
@user_errors
def import_checkpoint(file: str, config: str | None, force: bool, **options: Any) -> None:
    """Import a classifier the public patch-forensics code saved (*_net_D.pth) as a patchscope run.

    \b
    The file is read with torch.load(weights_only=True): anything beyond tensors
    and plain values is refused, and nothing in it runs. Its key names are mapped
    onto patchscope's model (shapes checked, every tensor used, every parameter
    and buffer filled), the output classes are put in patchscope's order
    (fake = 1), and OUT becomes a run that eval, score, patches and report use
    as it is; best.json records the file's name and sha256 (imported_from).
    Set --load-size/--crop-size to what it was trained at (its opt.yml
    loadSize/fineSize; the paper's Xception models 299, the ResNets 224).

    \b
    Example:
      patchscope import-checkpoint checkpoints/gp1-gan-winversion_seed0_xception_block2_constant_p20/bestval_net_D.pth \\
          --model xception_block2 --out runs/public_xb2
      patchscope eval runs/public_xb2 --test pgan=data/real,data/pgan
    """
    from patchscope.forensics.import_public import ImportConfig, import_checkpoint as run_import

    cli = {**overrides(options), "file": file}
    cfg = configs.resolve(ImportConfig, config_layers(config, "import_checkpoint"), cli, source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_import(cfg, force=force)
    source = summary["imported_from"]
    swapped = "classes swapped to fake = 1" if source["classes_swapped"] else "class order kept (fake = 1)"
    click.echo(f"imported {source['file']} (sha256 {source['sha256'][:12]}) as {summary['model']}: "
               f"{summary['tensors']} tensors, {swapped}; load size {summary['load_size']}, crop size "
               f"{summary['crop_size']}")
    click.echo(f"run: {summary['out']}")
