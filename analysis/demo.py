"""The embedded-default pipeline behind `patchscope demo`: built-in photographs to a scored classifier.

Stages are cached under the output folder: re-running resumes, `force` redoes everything.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from analysis.report import write_report
from forensics import config as configs
from forensics.builtin_images import dataset_complete, write_builtin_dataset
from forensics.evaluate import EvalConfig, evaluate
from forensics.train import TrainConfig, fit

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class DemoConfig:
    size: int = 32                                   # crop side of the built-in images, px
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"train": 800, "val": 200, "test": 400})
    quick_counts: dict[str, int] = field(default_factory=lambda: {"train": 192, "val": 64, "test": 96})
    train: dict[str, Any] = field(default_factory=dict)      # TrainConfig overrides
    quick_train: dict[str, Any] = field(default_factory=dict)  # further overrides for --quick


def load_demo_config(path: str | Path | None) -> DemoConfig:
    if path is None:
        path = DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    return configs.resolve(DemoConfig, configs.read_yaml(path) if path else {}, source=str(path))


def _stage(name: str, started: float, message: str) -> None:
    click.echo(f"[{name:>5}] {message} ({time.perf_counter() - started:.1f} s)")


def run_demo(out: str | Path, quick: bool = False, force: bool = False,
             config_path: str | Path | None = None) -> dict[str, Any]:
    """Prepare built-in data, train a patch classifier, evaluate it; print and return the summary."""
    cfg = load_demo_config(config_path)
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    counts = cfg.quick_counts if quick else cfg.counts

    started = time.perf_counter()
    data_root = out / "data"
    if not dataset_complete(data_root, counts, cfg.size, cfg.seed):
        shutil.rmtree(data_root, ignore_errors=True)
        write_builtin_dataset(data_root, counts, cfg.size, cfg.seed)
    _stage("data", started, f"{sum(counts.values())} real + {sum(counts.values())} fake crops "
                            f"of {cfg.size} px in {data_root}")

    started = time.perf_counter()
    train_options = {**cfg.train, **(cfg.quick_train if quick else {})}
    train_cfg = configs.resolve(TrainConfig, {"load_size": cfg.size, "crop_size": cfg.size, "seed": cfg.seed},
                                train_options, {"real": str(data_root / "real"), "fake": str(data_root / "fake"),
                                                "out": str(out / "classifier")}, source="demo config")
    summary = fit(train_cfg, resume=True)
    _stage("train", started, f"{train_cfg.model}: {summary['epochs']} epochs, best val patch accuracy "
                             f"{summary['best_val_patch_acc']:.4f} at epoch {summary['best_epoch']}")

    started = time.perf_counter()
    eval_out = out / "eval"
    result = evaluate(EvalConfig(run=str(out / "classifier"), tests=[f"builtin={data_root / 'real'},"
                                                                       f"{data_root / 'fake'}"],
                                 out=str(eval_out), force=True))
    metrics = result["results"]["builtin"]["after_softmax"]
    _stage("eval", started, f"AP {metrics['ap']:.4f}, accuracy {metrics['acc']:.4f} on {metrics['n']} test images")
    page = write_report(out, title="patchscope demo")
    click.echo(f"\nAP of the patch classifier: {metrics['ap']:.4f}   (results: {eval_out})")
    click.echo(f"report: {page}")
    return {"train": summary, "eval": metrics, "out": str(out), "report": str(page)}
