"""Retraining against a finetuned generator: sample it exactly as the original fakes were sampled, train a
new classifier with the old one's settings, and score old and new on both fake sets. Used by `analysis.residual`.

Under torchrun every rank calls `retrain` with the same settings: the three stages are sharded (sampling by
chunks, training with DDP, scoring by batches), rank 0 alone claims and writes the folder and decides what is
reused, and every rank returns the same result.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from patchscope.common import config as configs
from patchscope.common import distributed
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import (check_choice, check_counts, check_int, check_mapping, check_text,
                                      require)
from patchscope.common.device import PRECISIONS, resolve_device
from patchscope.common.errors import InputError
from patchscope.common.runfolder import RunFolder
from patchscope.common.userfiles import read_json
from patchscope.forensics import data
from patchscope.forensics.checkpoint import CHECKPOINT_CHOICES, load_classifier, load_resume_state, resolve_checkpoint
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.scoring import AGGREGATIONS
from patchscope.forensics.train import RESUMABLE_CHANGES as TRAIN_RESUMABLE_CHANGES
from patchscope.forensics.train import TrainConfig, fit
from patchscope.generators import checkpoint_sha256
from patchscope.generators.base import Generator
from patchscope.generators.custom import generator_sha256, open_generator
from patchscope.generators.dataset_folder import MANIFEST
from patchscope.generators.sampling import SampleConfig, sample_dataset, weights_sha256

log = logging.getLogger("patchscope.retrain")

KIND = "patchscope-retrain"
CLASSIFIERS = ("old", "new")          # the base classifier, the one retrained on the finetuned fakes
TEST_SETS = ("original", "finetuned")  # fakes of the original generator, of the finetuned one (same reals)
TEST_SPLIT = "test"
METRIC_KEYS = ("ap", "ap_real", "acc", "acc_real", "acc_fake", "roc_auc", "n")
STAGE_FILE = "stage.json"
# Settings a resumed retrain may change: where and how fast it runs, never what it computes.
RESUMABLE_CHANGES = ("device", "workers", "sample_batch_size", "eval_batch_size")
# The old classifier's training settings nest under `train`: a resume may change what `fit` lets it change.
RUN_FOLDER = RunFolder(holds="a retrain", kind=KIND, force_to="start over",
                       resumable=(*RESUMABLE_CHANGES, *(f"train.{name}" for name in TRAIN_RESUMABLE_CHANGES)),
                       writes=("fakes", "classifier", "eval", "metrics.json", "metrics.csv"), nested={"train": TrainConfig})
_SAMPLING_DEFAULTS = SampleConfig()
# RetrainConfig settings recorded in config.yaml beside the paths and the training settings, in this order.
RECORDED_SETTINGS = ("which", "aggregation", "precision", "on_bad_image", "device", "workers", "sample_batch_size",
                     "eval_batch_size")


# ----------------------------------------------------------------------------- cached stages

def stage_is_current(folder: str | os.PathLike, inputs: Mapping[str, Any], result: str) -> bool:
    """True when `folder` holds `result` computed from exactly these inputs (its stage.json says so)."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (folder / result).is_file() and recorded == json.loads(json.dumps(dict(inputs)))


def record_stage(folder: str | os.PathLike, inputs: Mapping[str, Any]) -> None:
    """Mark the results in `folder` as computed from `inputs`; written last, so a crash leaves no mark."""
    write_json(Path(folder) / STAGE_FILE, dict(inputs))


# ----------------------------------------------------------------------------- what to sample

@dataclass(frozen=True)
class SamplingPlan:
    """How the finetuned generator is sampled: the original fake set's settings, so only the generator differs."""

    counts: dict[str, int]    # images per split
    seed: int                 # split seeds derive from it as in generators.sampling (same latents as the original)
    size: int | None          # Lanczos working size (None: as generated)
    options: dict[str, Any]   # generator forward options (psi, alpha, ...)
    chunk: int                # rows per network call: fixes the arithmetic
    precision: str            # fp32 | bf16
    source: str               # where these settings were read
    made_by: str | None = None  # class of the generator the original set was sampled from, when recorded


def plan_sampling(original_fakes: str | os.PathLike, train_config: TrainConfig,
                  counts: Mapping[str, int] | None = None, seed: int | None = None) -> SamplingPlan:
    """The original set's manifest.json settings; without a manifest, the classifier's input size, the split
    sizes of the original set and seed 0. Given counts replace those of their splits only; a given seed wins."""
    original = Path(original_fakes)
    manifest = read_samples_manifest(original)
    splits = list(dict.fromkeys((train_config.train_split, train_config.val_split, TEST_SPLIT)))
    given = {str(k): int(v) for k, v in (counts or {}).items()}
    if manifest is not None:
        plan = SamplingPlan(
            counts={**{str(k): int(v) for k, v in (manifest.get("counts") or {}).items()}, **given},
            seed=int(manifest.get("seed", 0) if seed is None else seed), size=manifest.get("size"),
            options=dict(manifest.get("options") or {}),
            chunk=int(manifest.get("chunk", _SAMPLING_DEFAULTS.chunk)),
            precision=str(manifest.get("precision", _SAMPLING_DEFAULTS.precision)), source=str(original / MANIFEST),
            made_by=(manifest.get("generator") or {}).get("class") if isinstance(manifest.get("generator"), dict)
            else None)
    else:
        sizes = {split: len(data.list_images(original, split)) for split in splits if split not in given}
        plan = SamplingPlan(
            counts={**sizes, **given}, seed=0 if seed is None else int(seed),
            size=train_config.load_size or train_config.crop_size, options={}, chunk=_SAMPLING_DEFAULTS.chunk,
            precision=_SAMPLING_DEFAULTS.precision,
            source=f"the classifier's input size ({original} has no {MANIFEST})")
    missing = [split for split in splits if plan.counts.get(split, 0) < 1]
    if missing:
        raise InputError(f"counts {plan.counts}: the retrained classifier needs finetuned fakes in "
                         f"{', '.join(missing)}")
    return plan


def read_samples_manifest(folder: Path) -> dict[str, Any] | None:
    """The `generators.sampling` manifest of a fake set, or None when it has none (or one of another kind)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, "a sampled set's manifest.json (fix or remove it)")  # regular files only, bounded
    if not isinstance(manifest, dict) or manifest.get("kind") != "samples":
        log.info("%s: not a sampled set's manifest; using the classifier's input size instead", path)
        return None
    return manifest


# ----------------------------------------------------------------------------- the result

@dataclass
class RetrainResult:
    """What `retrain` made and measured; `metrics[classifier][test_set]` with classifier old|new and
    test set original|finetuned (both with the same reals)."""

    out: Path
    base_checkpoint: Path               # the old classifier's weights
    classifier: Path                    # the new classifier's run directory
    classifier_checkpoint: Path         # its weights (same `which` as the old one)
    fakes: Path                         # the finetuned generator's samples
    reals: Path
    original_fakes: Path
    sampling: SamplingPlan
    train: dict[str, Any]               # forensics.train.fit summary
    aggregation: str
    metrics: dict[str, dict[str, dict[str, float]]]
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "reused"

    def rows(self) -> list[dict[str, Any]]:
        """The 2x2 table, one row per (classifier, test set)."""
        return [{"classifier": who, "test_set": name, **self.metrics[who][name]}
                for who in CLASSIFIERS for name in TEST_SETS]


# ----------------------------------------------------------------------------- stages

def _base_train_config(checkpoint: Path, meta: Mapping[str, Any]) -> TrainConfig:
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise InputError(f"{checkpoint.with_suffix('.json')}: holds no training config; cannot retrain "
                         f"with the same settings")
    known = {f.name for f in fields(TrainConfig)}
    dropped = sorted(set(saved) - known)
    if dropped:
        log.warning("%s: ignoring training settings this version does not know: %s", checkpoint, ", ".join(dropped))
    return configs.resolve(TrainConfig, {k: v for k, v in saved.items() if k in known}, source=str(checkpoint))


def _as_generator(generator: Generator | str | os.PathLike,
                  config: RetrainConfig | None = None) -> tuple[Generator, str | None, str]:
    """The generator, its file or MODULE:CALLABLE (None when given as an object) and a digest that identifies it."""
    if isinstance(generator, Generator):
        return generator, None, weights_sha256(generator)
    if not generator:
        raise InputError("no finetuned generator given (--generator)")
    spec = str(generator)
    # CheckpointError, naming the file, for anything that is not a generator
    loaded = open_generator(spec, *((config.weights or None, config.latent_dim, config.resolution) if config else ()))
    return loaded, spec, generator_sha256(spec, loaded)


def _claim(out: Path, record: dict[str, Any], resume: bool, force: bool) -> None:
    """Refuse a folder holding anything else, or another retrain unless resumed or forced; clear it when forced."""
    RUN_FOLDER.check(out, record, resume=resume, force=force)
    if force:  # start over: remove what an earlier retrain wrote, and nothing else
        for path in (out / name for name in RUN_FOLDER.writes):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    RUN_FOLDER.save(out, record)


def _finished(run_dir: Path) -> bool:
    if not (run_dir / "resume.pt").is_file():
        return False
    return bool(load_resume_state(run_dir / "resume.pt")["state"].get("finished"))


def _evaluate_cached(checkpoint: Path, tests: list[str], folder: Path, aggregation: str,
                     settings: Mapping[str, Any]) -> tuple[dict[str, dict[str, float]], str]:
    """Metrics of one classifier on every test set: read back when computed from the same weights and sets.
    Rank 0, which writes the folder, decides; then every rank scores its share, or none does."""
    inputs, summary = distributed.run_on_main(_cached_evaluation, checkpoint, tests, folder, aggregation,
                                              settings["on_bad_image"])
    if summary is not None:
        how = "reused"
    else:
        summary = evaluate(EvalConfig(run=str(checkpoint), tests=tests, out=str(folder), split=TEST_SPLIT,
                                      aggregation=aggregation, force=True, **settings))
        distributed.run_on_main(record_stage, folder, inputs)
        how = "ran"
    results = summary["results"]
    return {name: {k: results[name][aggregation][k] for k in METRIC_KEYS} for name in TEST_SETS}, how


def _cached_evaluation(checkpoint: Path, tests: list[str], folder: Path, aggregation: str,
                       on_bad_image: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The stage's inputs, and the summary of `folder` when it was computed from them (else None)."""
    inputs = {"checkpoint_sha256": checkpoint_sha256(checkpoint), "tests": tests, "split": TEST_SPLIT,
              "aggregation": aggregation, "on_bad_image": on_bad_image}
    current = stage_is_current(folder, inputs, "metrics.json")
    return inputs, json.loads((folder / "metrics.json").read_text()) if current else None


def _check_batch(train: TrainConfig) -> None:
    """Refuse, on every rank alike and before anything is written, a training batch the processes cannot share
    (fit would refuse it too, but only after the sampling)."""
    world = distributed.world_size()
    if train.batch_size % (2 * world):
        distributed.refuse(f"the new classifier's batch size {train.batch_size} (the global batch: the old "
                           f"classifier's unless train.batch_size is set) does not split over {world} processes with "
                           f"half real and half fake images on each: use a number of processes that divides "
                           f"{train.batch_size // 2}")


def _agree(record: dict[str, Any]) -> None:
    """Every rank must retrain with the same settings (each samples, trains and scores its share of them)."""
    if len({json.dumps(r, sort_keys=True, default=str) for r in distributed.all_gather_object(record)}) > 1:
        distributed.refuse("retrain under torchrun: the processes were given different settings (each must get "
                           "the same command line and files)")


def _write_table(out: Path, result: RetrainResult) -> None:
    write_json(out / "metrics.json", {
        "base_checkpoint": str(result.base_checkpoint), "classifier": str(result.classifier),
        "fakes": str(result.fakes), "reals": str(result.reals), "original_fakes": str(result.original_fakes),
        "aggregation": result.aggregation, "split": TEST_SPLIT, "metrics": result.metrics})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["classifier", "test_set", *METRIC_KEYS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows())
    write_text(out / "metrics.csv", buffer.getvalue())


# ----------------------------------------------------------------------------- the stage chain

@dataclass
class RetrainConfig:
    classifier: str = ""                # the old classifier: run directory or .safetensors file
    generator: str = ""                 # the finetuned generator's checkpoint or MODULE:CALLABLE ("" with an in-memory one)
    weights: str = ""                   # MODULE:CALLABLE only: its finetuned generator.safetensors
    latent_dim: int | None = None       # MODULE:CALLABLE only: for a module without a latent_dim attribute
    resolution: int | None = None       # MODULE:CALLABLE only: for a module without a resolution attribute
    out: str = ""                       # fakes/, classifier/, eval/{old,new}/, config.yaml, metrics.json/.csv
    real: str | None = None             # reals (None: the old classifier's training reals)
    original_fakes: str | None = None   # the original generator's fakes (None: the old classifier's training fakes)
    counts: dict[str, int] | None = None  # finetuned fakes per split (None: as many as the original set)
    seed: int | None = None             # sampling seed (None: the original set's, so the same latents)
    which: str = "best"                 # best | last checkpoint of both classifiers
    aggregation: str = "after_softmax"  # image score behind accuracy (metrics.json has all)
    device: str = "auto"                # sampling, training and scoring
    precision: str = "auto"             # scoring precision; training keeps the old run's
    sample_batch_size: int = 16         # images per sampling step (does not change pixels)
    eval_batch_size: int = 64
    workers: int = 0                    # DataLoader workers when scoring
    on_bad_image: str = "skip"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields to change (default: none)

    def __post_init__(self) -> None:
        for name in ("classifier", "generator", "weights", "out", "device"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        for name in ("real", "original_fakes"):
            check_text(self, name, optional=True)
        check_counts(self, "counts", optional=True)
        check_int(self, "seed", 0, optional=True)
        check_choice(self, "which", CHECKPOINT_CHOICES)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_choice(self, "precision", PRECISIONS)
        for name in ("sample_batch_size", "eval_batch_size"):
            check_int(self, name, 1)
        check_int(self, "workers", 0)
        check_choice(self, "on_bad_image", data.BAD_IMAGE_POLICIES)
        check_mapping(self, "train")


def retrain(config: RetrainConfig, generator: Generator | None = None, *, resume: bool = True, force: bool = False,
            progress: bool = True) -> RetrainResult:
    """Sample the finetuned generator like the original fakes, train a new classifier on them, score both.

    `generator` is the finetuned network (None: load `config.generator`). original_fakes / reals default to
    the old classifier's training sets; counts and seed to the original set's manifest.json (the same latents,
    now through the finetuned generator). OUT gets fakes/ (generators.sampling), classifier/ (forensics.train,
    same TrainConfig but fake = fakes/), eval/{old,new}/ (forensics.evaluate on the test splits), config.yaml and
    metrics.json/.csv (2x2). Every stage is cached: re-running resumes sampling and training and reuses finished
    evaluations; `resume=False` refuses an earlier retrain in OUT, `force` redoes every stage.
    Under torchrun every rank calls it with the same settings (checked) and returns the same result.
    """
    for name in ("classifier", "out"):
        require(config, name)
    with distributed.alike():  # the same inputs on every rank: a refusal is printed once
        distributed.setup(resolve_device(config.device))
        base_checkpoint = resolve_checkpoint(config.classifier, config.which)  # one line naming a missing run
        _, base_meta = load_classifier(base_checkpoint)
        base_config = _base_train_config(base_checkpoint, base_meta)
        reals, original_fakes = config.real or base_config.real, config.original_fakes or base_config.fake
        if not reals or not original_fakes:
            raise InputError(f"{base_checkpoint}: records no training reals/fakes; give reals and original_fakes")
        reals, original_fakes, out = Path(reals), Path(original_fakes), Path(config.out)
        fakes, run_dir = out / "fakes", out / "classifier"
        train_config = configs.resolve(TrainConfig, configs.to_dict(base_config), config.train,
                                       {"real": str(reals), "fake": str(fakes), "out": str(run_dir),
                                        "device": config.device},
                                       source="retrain")
        # not the old run's number of processes: fit records the launch's own in classifier/ (any resume may
        # change it), so the record does not claim one
        train_config = replace(train_config, world_size=None)
        _check_batch(train_config)
        generator, generator_file, generator_sha = _as_generator(generator if generator is not None
                                                                 else config.generator, config)
        plan = plan_sampling(original_fakes, base_config, config.counts, config.seed)
    if plan.options and plan.made_by and plan.made_by != type(generator).__name__:
        # Forward options are per architecture (PGAN's alpha, StyleGAN's psi): they do not carry over.
        if distributed.is_main():
            log.warning("the original fakes were sampled from a %s with %s; the finetuned generator is a %s, "
                        "sampled with its own defaults", plan.made_by, plan.options, type(generator).__name__)
        plan = replace(plan, options={})
    record = {"kind": KIND, "base_checkpoint": str(base_checkpoint),
              "base_checkpoint_sha256": checkpoint_sha256(base_checkpoint),
              "generator": str(generator_file) if generator_file else "(in memory)", "generator_sha256": generator_sha,
              **({"weights": config.weights} if config.weights else {}),
              "reals": str(reals), "original_fakes": str(original_fakes), "sampling": asdict(plan),
              **{name: getattr(config, name) for name in RECORDED_SETTINGS}, "train": configs.to_dict(train_config)}
    _agree(record)  # before anything is written
    distributed.run_on_main(_claim, out, record, resume, force)  # a refusal of rank 0 stops every rank
    stages = {}

    if distributed.is_main():
        log.info("sampling %s into %s (settings of %s)", generator_file or "the finetuned generator", fakes,
                 plan.source)
    sampling = SampleConfig(generator=str(generator_file or ""), weights=config.weights if generator_file else "",
                            out=str(fakes), counts=plan.counts, seed=plan.seed,
                            size=plan.size, opts=plan.options, batch_size=config.sample_batch_size, chunk=plan.chunk,
                            device=config.device, precision=plan.precision)
    sampled = sample_dataset(sampling, generator, progress=progress)  # "written": summed over the ranks
    stages["sample"] = "ran" if any(s["written"] for s in sampled["splits"].values()) else "reused"

    finished_before = distributed.run_on_main(_finished, run_dir)  # rank 0 may be settling a half-saved epoch
    train_summary = fit(train_config, resume=True)
    stages["train"] = "reused" if finished_before else "ran"

    tests = [f"original={reals},{original_fakes}", f"finetuned={reals},{fakes}"]
    settings = {"batch_size": config.eval_batch_size, "device": config.device, "precision": config.precision,
                "workers": config.workers, "on_bad_image": config.on_bad_image}
    new_checkpoint = distributed.run_on_main(resolve_checkpoint, run_dir, config.which)
    metrics = {}
    for who, checkpoint in zip(CLASSIFIERS, (base_checkpoint, new_checkpoint)):
        metrics[who], stages[f"eval_{who}"] = _evaluate_cached(checkpoint, tests, out / "eval" / who,
                                                               config.aggregation, settings)
    result = RetrainResult(out=out, base_checkpoint=base_checkpoint, classifier=run_dir,
                           classifier_checkpoint=new_checkpoint, fakes=fakes, reals=reals,
                           original_fakes=original_fakes, sampling=plan, train=train_summary,
                           aggregation=config.aggregation, metrics=metrics, stages=stages)
    distributed.run_on_main(_write_table, out, result)
    if distributed.is_main():
        log.info("stages: %s", ", ".join(f"{stage} {how}" for stage, how in stages.items()))
        for row in result.rows():
            log.info("%s classifier on %s fakes: AP %.4f, accuracy %.4f (fake %.4f)", row["classifier"],
                     row["test_set"], row["ap"], row["acc"], row["acc_fake"])
    return result
