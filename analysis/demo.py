"""The embedded-default pipeline behind `patchscope demo`: the paper's whole story on built-in photographs.

real crops -> PGAN fakes -> patch classifier -> eval + heatmaps -> top patches -> exaggeration ->
finetuning against the classifier -> retraining -> report. Stages are cached (see `analysis.demo_stages`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import click

from patchscope.analysis.demo_stages import StageBook
from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune
from patchscope.analysis.heatmaps import write_eval_heatmaps
from patchscope.analysis.patches import run_patches
from patchscope.analysis.report.build import write_report
from patchscope.analysis.residual import RetrainStudyConfig, run_retrain_study
from patchscope.analysis.shift_grid import ExaggerateConfig, run_exaggerate
from patchscope.attacks.perceptual import LPIPS_NETS, find_backbone_weights
from patchscope.common import config as configs
from patchscope.common import runfolder
from patchscope.common.atomic import write_json
from patchscope.common.checks import check_choice, check_counts, check_int, check_mapping, check_text
from patchscope.common.device import PRECISIONS, resolve_device
from patchscope.common.errors import InputError
from patchscope.common.labels import LABEL_NAMES, LABELS
from patchscope.configs import bundled_config
from patchscope.forensics.builtin_images import write_builtin_reals
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.train import TrainConfig, fit
from patchscope.generators.io.formats import checkpoint_sha256
from patchscope.generators.sampling import SampleConfig, sample_dataset
from patchscope.generators.training.trainer import GANTrainConfig, train_gan

DEFAULT_CONFIG = bundled_config("demo.yaml")
# A PGAN grown by `patchscope train-gan` on the demo's train crops (the command is in its .json).
BUNDLED_GENERATOR = Path(__file__).resolve().parent / "demo_assets" / "pgan32_builtin.pt"
TEST_SET = "builtin"
SUMMARY_FILE = "demo_summary.json"


@dataclass
class DemoConfig:
    size: int = 32                      # crop side of the built-in photographs, px (the generator's resolution)
    seed: int = 0                       # crops, sampling latents (train/test/val: seed, +1, +2), training
    counts: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 400, "test": 800})  # reals
    generator: str | None = None        # PGAN checkpoint with its discriminator; None: the bundled one
    train_gan: dict[str, Any] | None = None  # GANTrainConfig settings: grow the generator here instead
    sample_batch_size: int = 64
    train: dict[str, Any] = field(default_factory=dict)       # TrainConfig settings of the classifier
    heatmaps: int = 8                   # heatmap images per group (most / least fake, real and fake)
    patches: int = 100                  # most predictive patches per class
    exaggerate: dict[str, Any] = field(default_factory=dict)  # ExaggerateConfig settings
    finetune: dict[str, Any] = field(default_factory=dict)    # FinetuneConfig settings
    retrain: dict[str, Any] = field(default_factory=dict)     # RetrainStudyConfig settings
    lpips_net: str = "alex"
    lpips_weights: str | None = None    # backbone file; None: the torch cache, else a random backbone
    device: str = "auto"                # every stage's device, unless its own settings name one
    precision: str = "auto"             # every stage's precision (auto: bf16 on CUDA and bf16 CPUs), likewise
    quick: dict[str, Any] = field(default_factory=dict)       # overrides for --quick (mappings merge)

    def __post_init__(self) -> None:
        check_int(self, "size", 4)
        check_int(self, "seed", 0)
        check_counts(self, "counts")
        check_text(self, "generator", optional=True)
        check_int(self, "sample_batch_size", 1)
        check_int(self, "heatmaps", 0)
        check_int(self, "patches", 1)
        for name in ("train_gan",):
            check_mapping(self, name, optional=True)
        for name in ("train", "exaggerate", "finetune", "retrain", "quick"):
            check_mapping(self, name)
        check_choice(self, "lpips_net", LPIPS_NETS)
        check_text(self, "lpips_weights", optional=True)
        check_text(self, "device")
        check_choice(self, "precision", PRECISIONS)


def load_demo_config(path: str | Path | None = None, quick: bool = False) -> DemoConfig:
    """configs/demo.yaml, updated by the file at `path` (mappings key by key), then by its `quick` overrides."""
    if not DEFAULT_CONFIG.is_file():
        raise InputError(f"{DEFAULT_CONFIG}: the demo's settings are missing; this patchscope installation is "
                         f"incomplete (reinstall it)")
    merged = _merged({}, configs.read_yaml(DEFAULT_CONFIG))
    if path is not None:
        merged = _merged(merged, configs.read_yaml(path))
    cfg = configs.resolve(DemoConfig, merged, source=str(path or DEFAULT_CONFIG))
    return with_quick(cfg) if quick else cfg


def _merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `changes`, mappings within mappings key by key; `max-epochs` is `max_epochs`."""
    out = {str(k).replace("-", "_"): v for k, v in base.items()}
    for key, value in changes.items():
        key = str(key).replace("-", "_")
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            out[key] = _merged(current, value)
        else:
            out[key] = _merged({}, value) if isinstance(value, Mapping) else value
    return out


def with_quick(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with its `quick` overrides applied; a mapping setting is updated key by key, not replaced."""
    settings = _merged(configs.to_dict(replace(cfg, quick={})), cfg.quick)
    return configs.resolve(DemoConfig, settings, source="demo quick")


def _runtime(cfg: DemoConfig) -> dict[str, str]:
    """Where and how fast the stages run: the first layer of each stage's settings, so its own can override."""
    return {"device": cfg.device, "precision": cfg.precision}


def _lpips_settings(cfg: DemoConfig) -> dict[str, Any]:
    """LPIPS with real backbone weights when a file is found; else a random backbone, said out loud."""
    found = find_backbone_weights(cfg.lpips_net, cfg.lpips_weights)
    return {"lpips_net": cfg.lpips_net, "lpips_weights": str(found) if found else None, "lpips_random": found is None}


def _majority(records: list[dict[str, Any]], classes: list[str], label: int) -> str:
    counts = Counter(classes[r["semantic"]] for r in records if r["label"] == label and r["semantic"] is not None)
    if not counts:
        return "-"
    name, count = counts.most_common(1)[0]
    return f"{name} {count / sum(counts.values()):.0%}"


class Demo:
    """One demo folder: every stage as a method, each cached by the stage book."""

    def __init__(self, cfg: DemoConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.book = StageBook(out)
        self.reals = out / "data" / "real"
        self.fakes = out / "fakes"
        self.classifier = out / "classifier"
        self.generator = Path(cfg.generator) if cfg.generator else BUNDLED_GENERATOR
        self.lpips = _lpips_settings(cfg)

    def _portable(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings as hashed into a stage key: paths inside the demo folder relative to it, the generator's path
        left out (the generator stage's run stands for it), so moving or renaming the folder redoes nothing."""
        inside, generator = str(self.out), str(self.generator)

        def portable(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: portable(v) for k, v in value.items()}
            if value == generator:
                return "<generator>"
            if isinstance(value, str) and value.startswith(inside):
                return "<out>" + value[len(inside):]
            return value

        return portable(settings)

    def data(self) -> dict[str, Any]:
        cfg = self.cfg
        settings = {"size": cfg.size, "seed": cfg.seed, "counts": cfg.counts}

        def work(resume: bool) -> dict[str, Any]:
            record = write_builtin_reals(self.reals, cfg.counts, cfg.size, cfg.seed) / "dataset.json"
            return {"n": sum(cfg.counts.values()), "photos": len(json.loads(record.read_text())["photos"])}

        return self.book.run("data", self.out / "data", settings, [], work,
                             lambda s: f"{s['n']} real crops of {cfg.size} px from {s['photos']} photographs "
                                       f"bundled with scikit-image and scikit-learn")

    def gan(self) -> dict[str, Any]:
        """The generator: grown here when `train_gan` is set, else the given (or bundled) checkpoint."""
        cfg = self.cfg
        if cfg.train_gan is None:
            if not self.generator.is_file():
                raise InputError(f"{self.generator}: generator checkpoint not found (the demo config's `generator`)")
            settings = {"generator": checkpoint_sha256(self.generator)}
            work = lambda resume: {"generator": str(self.generator), "grown": False}  # noqa: E731
        else:
            gan_cfg = configs.resolve(GANTrainConfig, {"resolution": cfg.size, "seed": cfg.seed,
                                                       "device": cfg.device}, cfg.train_gan,
                                      {"images": str(self.reals / "train"), "out": str(self.out / "gan")},
                                      source="demo train_gan")
            settings = self._portable(configs.to_dict(gan_cfg))

            def work(resume: bool) -> dict[str, Any]:
                summary = train_gan(gan_cfg, resume=resume)
                return {"generator": summary["generator"], "grown": True, "images": summary["images"]}

        summary = self.book.run("generator", self.out / "gan", settings, ["data"], work,
                                lambda s: f"PGAN {'grown in' if s['grown'] else 'from'} {_shown(s['generator'])}")
        if summary["grown"]:  # a given file is known by its checksum; its path is today's
            self.generator = Path(summary["generator"])
        return summary

    def sample(self) -> dict[str, Any]:
        cfg = self.cfg

        def work(resume: bool) -> dict[str, Any]:
            sample_dataset(SampleConfig(generator=str(self.generator), out=str(self.fakes), counts=cfg.counts,
                                        seed=cfg.seed, size=cfg.size, batch_size=cfg.sample_batch_size,
                                        device=str(resolve_device(cfg.device))))
            return {"n": sum(cfg.counts.values())}

        return self.book.run("fakes", self.fakes, {"size": cfg.size}, ["data", "generator"], work,
                             lambda s: f"{s['n']} PGAN samples in {self.fakes}")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        train_cfg = configs.resolve(TrainConfig, {"load_size": cfg.size, "crop_size": cfg.size, "seed": cfg.seed,
                                                  **_runtime(cfg)},
                                    cfg.train, {"real": str(self.reals), "fake": str(self.fakes),
                                                "out": str(self.classifier)}, source="demo train")

        def work(resume: bool) -> dict[str, Any]:
            summary = fit(train_cfg, resume=resume)
            return {key: summary[key] for key in ("epochs", "best_epoch", "best_val_patch_acc")}

        return self.book.run("classifier", self.classifier, self._portable(configs.to_dict(train_cfg)), ["fakes"],
                             work,
                             lambda s: f"{train_cfg.model}: {s['epochs']} epochs, best val patch accuracy "
                                       f"{s['best_val_patch_acc']:.4f} at epoch {s['best_epoch']}")

    def evaluate(self) -> dict[str, Any]:
        eval_cfg = EvalConfig(run=str(self.classifier), tests=[f"{TEST_SET}={self.reals},{self.fakes}"],
                              out=str(self.out / "eval"), force=True, **_runtime(self.cfg))

        def work(resume: bool) -> dict[str, Any]:
            metrics = evaluate(eval_cfg)["results"][TEST_SET]["after_softmax"]
            write_eval_heatmaps(eval_cfg, self.cfg.heatmaps)
            return {key: metrics[key] for key in ("ap", "acc", "n")}

        return self.book.run("eval", self.out / "eval", {"heatmaps": self.cfg.heatmaps, **_runtime(self.cfg)},
                             ["classifier"], work,
                             lambda s: f"AP {s['ap']:.4f}, accuracy {s['acc']:.4f} on {s['n']} test images; "
                                       f"heatmaps in {self.out / 'eval' / 'heatmaps'}")

    def patches(self) -> dict[str, Any]:
        def work(resume: bool) -> dict[str, Any]:
            result = run_patches(str(self.classifier), str(self.reals), str(self.fakes), out=str(self.out / "patches"),
                                 n=self.cfg.patches, force=True, **_runtime(self.cfg))
            return {"segmenter": result["segmenter"], "n": len(result["top"]),
                    **{LABEL_NAMES[label]: _majority(result["top"], result["classes"], label) for label in LABELS}}

        return self.book.run("patches", self.out / "patches", {"n": self.cfg.patches, **_runtime(self.cfg)},
                             ["classifier"], work,
                             lambda s: f"{s['n']} most predictive patches ({s['segmenter']} segmenter): "
                                       f"fake mostly {s['fake']}, real mostly {s['real']}")

    def exaggerate(self) -> dict[str, Any]:
        shift_cfg = configs.resolve(ExaggerateConfig, {"seed": self.cfg.seed, **_runtime(self.cfg)}, self.lpips,
                                    self.cfg.exaggerate, {"generator": str(self.generator),
                                                          "classifier": str(self.classifier),
                                                          "out": str(self.out / "exaggerate")},
                                    source="demo exaggerate")

        def work(resume: bool) -> dict[str, Any]:
            result = run_exaggerate(shift_cfg, resume=resume)
            return {"rows": result["rows"], "space": result["space"], "lpips_random": shift_cfg.lpips_random}

        def describe(s: dict[str, Any]) -> str:
            along = ", ".join(f"k={r['k']:+g}: {r['p_fake']:.2f}" + (f" ({r['logit']:.1f})" if "logit" in r else "")
                              for r in s["rows"])
            return f"P(fake) (logit) along the shift ({s['space']} space): {along}"

        return self.book.run("exaggerate", self.out / "exaggerate", self._portable(configs.to_dict(shift_cfg)),
                             ["classifier", "generator"], work, describe)

    def finetune(self) -> dict[str, Any]:
        tune_cfg = configs.resolve(FinetuneConfig, {"seed": self.cfg.seed, **_runtime(self.cfg)}, self.lpips,
                                   self.cfg.finetune, {"generator": str(self.generator),
                                                       "classifier": str(self.classifier), "real": str(self.reals),
                                                       "out": str(self.out / "finetune")}, source="demo finetune")

        def work(resume: bool) -> dict[str, Any]:
            result = run_finetune(tune_cfg, resume=resume)
            if result["generator"] is None:
                raise click.ClickException(f"finetuning diverged before its first checkpoint: {result['stopped']}")
            rows = {row["generator"]: row for row in result["rows"]}
            return {"generator": result["generator"], "steps": result["steps"], "stopped": result["stopped"],
                    "rows": rows}

        def describe(s: dict[str, Any]) -> str:
            before, after = s["rows"]["original"], s["rows"]["finetuned"]
            return (f"{s['steps']} steps; frozen classifier on fresh samples: accuracy {before['acc']:.3f} -> "
                    f"{after['acc']:.3f}, AP {before['ap']:.3f} -> {after['ap']:.3f}"
                    + (f" (stopped: {s['stopped']})" if s["stopped"] else ""))

        return self.book.run("finetune", self.out / "finetune", self._portable(configs.to_dict(tune_cfg)),
                             ["classifier", "generator"], work, describe)

    def retrain(self, finetuned: str) -> dict[str, Any]:
        study_cfg = configs.resolve(RetrainStudyConfig, {"n": self.cfg.patches, **_runtime(self.cfg)},
                                    self.cfg.retrain, {"classifier": str(self.classifier), "generator": finetuned,
                                                       "out": str(self.out / "retrain")}, source="demo retrain")

        def work(resume: bool) -> dict[str, Any]:
            comparison = run_retrain_study(study_cfg, resume=resume)["comparison"]
            return {"metrics": comparison["metrics"]}

        def describe(s: dict[str, Any]) -> str:
            old, new = s["metrics"]["old"]["finetuned"], s["metrics"]["new"]["finetuned"]
            return (f"on finetuned fakes: old classifier AP {old['ap']:.4f} accuracy {old['acc']:.4f}; "
                    f"retrained AP {new['ap']:.4f} accuracy {new['acc']:.4f}")

        return self.book.run("retrain", self.out / "retrain", self._portable(configs.to_dict(study_cfg)),
                             ["finetune"], work, describe)


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies below it (shorter output), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def summary_rows(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The numbers of the paper's story, in its order."""
    metrics = results["retrain"]["metrics"]
    rows = [("AP of the patch classifier (original fakes)", results["eval"]["ap"]),
            ("its accuracy on original fakes + reals", metrics["old"]["original"]["acc"]),
            ("its accuracy on finetuned fakes + reals", metrics["old"]["finetuned"]["acc"]),
            ("share of finetuned fakes it still calls fake", metrics["old"]["finetuned"]["acc_fake"]),
            ("its AP on finetuned fakes", metrics["old"]["finetuned"]["ap"]),
            ("AP of the retrained classifier (finetuned fakes)", metrics["new"]["finetuned"]["ap"])]
    rows += [(f"P(fake) along the exaggeration, k = {row['k']:+g}", row["p_fake"])
             for row in results["exaggerate"]["rows"]]
    rows += [(f"its logit (mean log-odds), k = {row['k']:+g}", row["logit"])  # P(fake) saturates near 1
             for row in results["exaggerate"]["rows"] if "logit" in row]
    return rows


def format_summary(rows: list[tuple[str, float]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)


def run_demo(out: str | Path, quick: bool = False, force: bool = False,
             config_path: str | Path | None = None) -> dict[str, Any]:
    """Run every stage (cached), write the report, print and return the summary. The folder is held meanwhile:
    a second demo into it is refused in one line instead of interleaving with (or deleting under) this one."""
    cfg = load_demo_config(config_path, quick)
    out = runfolder.hold(out)
    try:
        if force:
            runfolder.clear(out)
        return _run_stages(cfg, out, quick)
    finally:
        runfolder.release(out)


def _run_stages(cfg: DemoConfig, out: Path, quick: bool) -> dict[str, Any]:
    demo = Demo(cfg, out)
    notes = []
    if demo.lpips["lpips_random"]:
        notes.append(f"No {cfg.lpips_net} LPIPS backbone weights were found (set lpips_weights in the demo config or "
                     f"put them in the torch cache): LPIPS used a random backbone, so its distances are only a rough "
                     f"image similarity.")
        click.echo(f"note: {notes[-1]}")
    results: dict[str, Any] = {"data": demo.data(), "generator": demo.gan()}
    results["fakes"] = demo.sample()
    results["classifier"] = demo.train()
    results["eval"] = demo.evaluate()
    results["patches"] = demo.patches()
    results["exaggerate"] = demo.exaggerate()
    results["finetune"] = demo.finetune()
    results["retrain"] = demo.retrain(results["finetune"]["generator"])
    rows = summary_rows(results)
    write_json(out / SUMMARY_FILE, {"rows": [{"name": name, "value": value} for name, value in rows],
                                    "stages": {name: r.get("seconds") for name, r in results.items()},
                                    "quick": quick, "notes": notes})
    page = write_report(out, title="patchscope demo")
    click.echo("\n" + format_summary(rows))
    click.echo(f"\nreport: {page}")
    return {**results, "summary": dict(rows), "out": str(out), "report": str(page)}
