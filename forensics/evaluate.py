"""Run a classifier over test sets: patch probabilities, image scores, metrics, tables and PR curves.

`predict` serves validation during training; `evaluate` is what `patchscope eval` runs.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchscope.common import config as configs
from patchscope.common import distributed
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import check_bool, check_choice, check_int, check_text
from patchscope.common.compiled import maybe_compile
from patchscope.common.device import PRECISIONS, autocast, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.labels import p_fake
from patchscope.common.progress import progress_bar
from patchscope.forensics import checkpoint, data
from patchscope.forensics.device_crop import CROP_ON, to_device_batch
from patchscope.forensics.perturb import parse_perturbations
from patchscope.forensics.receptive import receptive_field
from patchscope.forensics.scoring import AGGREGATIONS, append_csv, compute_metrics, image_scores, plot_pr_curves

log = logging.getLogger("patchscope.eval")

# What part of each (resized) image a classifier scores: see `view_crop_size`.
VIEWS = ("auto", "full", "crop")


def view_crop_size(view: str, model: Any, load_size: int | None, crop_size: int | None) -> tuple[str, int | None]:
    """(view, crop size for `data.RealFakeDataset`) of eval, score, patches, heatmaps and robustness sweeps.

    `crop`: the centre `crop_size` square of the image resized to `load_size`. `full`: the whole resized image,
    i.e. its centred `load_size` square (crop size None: the square of each image's shorter side, the data
    code's rule; that is the same square once `load_size` is set). `auto`, as the public patch-forensics code's
    test transform: `full` for patch classifiers, whose patch scores average over the whole image, and `crop`
    for whole-image models (`model.whole_image`: one output cell, the full-model baselines), which were trained
    on `crop_size` inputs; `crop` too when no `load_size` is set (no resize: images may differ in size). Views
    differ only where `crop_size` is set and differs from `load_size`.
    """
    if view not in VIEWS:
        raise InputError(f"view={view!r}: expected one of {', '.join(VIEWS)}")
    if view == "auto":
        view = "crop" if getattr(model, "whole_image", False) or load_size is None else "full"
    return view, (load_size if view == "full" else crop_size)


@dataclass(frozen=True)
class ScoringView:
    """How a trained classifier scores images (eval, score, patches, heatmaps, robustness): the sizes asked for,
    else those it was trained at; the view and the crop the data code takes for it; the smallest image accepted."""
    load_size: int | None
    crop_size: int | None       # as configured (recorded); `input_crop` is what is cut
    view: str
    input_crop: int | None
    min_size: int


def scoring_view(model: Any, meta: dict[str, Any], view: str, load_size: int | None = None,
                 crop_size: int | None = None, warn: logging.Logger | None = None) -> ScoringView:
    """The `ScoringView` of a loaded classifier and its metadata; with `warn`, sizes other than the trained ones
    are said there (`warn_size_mismatch`)."""
    trained = meta.get("config", {})
    load_size, crop_size = load_size or trained.get("load_size"), crop_size or trained.get("crop_size")
    if warn is not None:
        warn_size_mismatch(trained, load_size, crop_size, warn)
    view, input_crop = view_crop_size(view, model, load_size, crop_size)
    rf_size = receptive_field(model).size
    return ScoringView(load_size, crop_size, view, input_crop, min(rf_size, input_crop or load_size or rf_size))


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32",
            memory_format: torch.memory_format = torch.channels_last,
            keep_logits: bool = False, gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch P(fake) maps (N x H' x W', float32, CPU) — or logits when `keep_logits` — and labels.

    `gather`: the loader holds this rank's share of the items (torchrun); every rank gets all of them back, in
    item order, as one process scoring the whole set would (a rank whose share is empty included).
    """
    model.eval()
    outputs, labels, index = [], [], []
    cuda = device.type == "cuda"
    for batch in progress_bar(loader, desc="scoring", unit="batch", leave=False):
        x, y, i = to_device_batch(batch, device, memory_format)  # host or device crops (forensics.device_crop)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        # CUDA: a copy into pinned host memory that does not wait for the GPU (one synchronize after the loop),
        # so the next batch is queued while this one computes
        outputs.append((logits if keep_logits else p_fake(logits)).to("cpu", non_blocking=cuda))
        labels.append(y)
        if gather:  # some callers' loaders carry no index
            index.append(torch.as_tensor(i))
    if cuda:
        torch.cuda.synchronize(device)  # every non-blocking copy has landed before the outputs are read
    if gather and distributed.active():
        parts = distributed.all_gather_object((torch.cat(index), torch.cat(outputs), torch.cat(labels))
                                              if outputs else None)
        parts = [part for part in parts if part is not None]
        if not parts:
            raise InputError("nothing to score: the test set is empty")
        index, outputs, labels = ([torch.cat([part[k] for part in parts])] for k in range(3))
    if not outputs:
        raise InputError("nothing to score: the test set is empty")
    if gather:
        order = torch.argsort(torch.cat(index))
        return torch.cat(outputs)[order], torch.cat(labels)[order]
    return torch.cat(outputs), torch.cat(labels)


def parse_test_spec(spec: str) -> tuple[str, str, str]:
    """`name=real_dir,fake_dir` -> (name, real, fake)."""
    name, sep, paths = spec.partition("=")
    real, comma, fake = paths.partition(",")
    if not sep or not comma or not name or not real or not fake:
        raise InputError(f"--test {spec!r}: expected NAME=REAL_DIR,FAKE_DIR")
    # NAME becomes part of paths under the output folder (scores_NAME.csv, heatmaps/NAME/, robustness/NAME/):
    # a `..` part or a leading separator would write elsewhere. Refused here, where every command reads the spec.
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or "\0" in name:
        raise InputError(f"--test {spec!r}: NAME {name!r} must stay inside the output folder (no '..' part, "
                         "no leading '/'); it names files and folders there")
    return name, real, fake


@dataclass
class EvalConfig:
    run: str = ""                                   # classifier run directory or .safetensors file
    tests: list[str] = field(default_factory=list)  # NAME=REAL,FAKE test sets
    out: str | None = None                          # results folder (default: <run>/eval)
    which: str = "best"                             # best | last checkpoint of a run directory
    split: str = "test"                             # split folder used when the sources have splits
    aggregation: str = "after_softmax"              # image score used for accuracy and the PR curve
    load_size: int | None = None                    # None: as the classifier was trained
    crop_size: int | None = None
    view: str = "auto"                              # auto | full | crop: what of each image is scored (view_crop_size)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False                           # torch.compile the classifier for scoring (common.compiled)
    workers: int = 0
    crop_on: str = "auto"                           # auto | host | device: where items are cropped (device_crop)
    on_bad_image: str = "skip"
    store: str | None = None                        # prepared image store folder (forensics.store)
    force: bool = False                             # replace an existing metrics.json (and robustness results)
    # What analysis.evaluation.run_eval adds after the metrics; here so a YAML file can set them and
    # config.yaml records them. heatmaps: pages of the N easiest and hardest images per class (0 = none).
    heatmaps: int = 0
    perturb: list[str] = field(default_factory=list)  # KIND:LEVEL[,LEVEL...] robustness sweeps, e.g. jpeg:95,75

    def __post_init__(self) -> None:
        for name in ("run", "split", "device"):
            check_text(self, name)
        check_text(self, "out", optional=True)
        expected = f"setting tests={self.tests!r}: expected a list of NAME=REAL_DIR,FAKE_DIR strings"
        if not isinstance(self.tests, list) or not all(isinstance(spec, str) for spec in self.tests):
            raise InputError(expected)
        try:
            names = [parse_test_spec(spec)[0] for spec in self.tests]
        except InputError as err:
            raise InputError(f"{expected} ({err})") from None
        if len(set(names)) != len(names):
            raise InputError(f"setting tests: the test set names must differ, got {', '.join(names)}")
        check_choice(self, "which", checkpoint.CHECKPOINT_CHOICES)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_int(self, "load_size", 1, optional=True)
        check_int(self, "crop_size", 1, optional=True)
        check_choice(self, "view", VIEWS)
        check_int(self, "batch_size", 1)
        check_choice(self, "precision", PRECISIONS)
        check_int(self, "workers", 0)
        check_choice(self, "crop_on", CROP_ON)
        check_choice(self, "on_bad_image", data.BAD_IMAGE_POLICIES)
        check_text(self, "store", optional=True)
        check_bool(self, "force")
        check_bool(self, "compile")
        check_int(self, "heatmaps", 0)
        if isinstance(self.perturb, str):  # `perturb: jpeg:95,75` in YAML: one spec, as one --perturb
            self.perturb = [self.perturb]
        if not isinstance(self.perturb, (list, tuple)) or not all(isinstance(s, str) for s in self.perturb):
            raise InputError(f"setting perturb={self.perturb!r}: expected a list of KIND:LEVEL[,LEVEL...] "
                             f"strings, e.g. [jpeg:95,75, blur:1,2]")
        self.perturb = list(self.perturb)
        try:  # refused when the settings are built, before any test set is scored
            parse_perturbations(self.perturb)
        except InputError as err:
            raise InputError(f"setting perturb={self.perturb!r}: expected KIND:LEVEL[,LEVEL...] sweeps ({err})") from None


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score every test set with every aggregation; write metrics.json, metrics.csv, pr_curve.png."""
    if not config.tests:
        raise InputError("no test set given (--test NAME=REAL_DIR,FAKE_DIR)")
    specs = [parse_test_spec(s) for s in config.tests]
    device = distributed.setup(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    configure_backends(device)
    model, meta = checkpoint.load_classifier(config.run, config.which, device)
    model = model.to(memory_format=torch.channels_last)
    sizes = scoring_view(model, meta, config.view, config.load_size, config.crop_size, warn=log)
    # the test sets are scored by `scorer`: compiled when asked (eager after one warning where it cannot be)
    scorer = maybe_compile(model, config.compile, device, "the classifier")
    out = Path(config.out) if config.out else _run_dir(config.run) / "eval"
    distributed.run_on_main(_check_out, out, config.force)

    results: dict[str, Any] = {}
    curves = {}
    rows = []
    for name, real, fake in specs:
        dataset = data.load_split(real, fake, config.split, load_size=sizes.load_size, crop_size=sizes.input_crop,
                                  min_size=sizes.min_size, on_bad_image=config.on_bad_image, cache=False,
                                  workers=config.workers, train=False, seed=0, store=config.store)
        loader = data.make_loader(dataset, config.batch_size, train=False, workers=config.workers,
                                  device_type=device.type, rank=distributed.rank(),
                                  world_size=distributed.world_size(), crop_on=config.crop_on)
        logits, labels = predict(scorer, loader, device, precision, keep_logits=True, gather=True)
        patch_probs = p_fake(logits)
        per_mode = {}
        for mode in AGGREGATIONS:
            scores = image_scores(logits, mode)
            per_mode[mode] = compute_metrics(scores, labels, patch_probs=patch_probs)
            rows.append({"run": str(config.run), "test_set": name, "aggregation": mode, **per_mode[mode]})
        results[name] = per_mode
        chosen = image_scores(logits, config.aggregation)
        curves[name] = (chosen.numpy(), labels.numpy())
        if distributed.is_main():
            _write_scores(out / f"scores_{name}.csv", dataset, chosen, labels)
        m = per_mode[config.aggregation]
        log.info("%s: AP %.4f, accuracy %.4f (real %.4f, fake %.4f), n=%d",
                 name, m["ap"], m["acc"], m["acc_real"], m["acc_fake"], m["n"])
    summary = {"run": str(config.run), "checkpoint_epoch": meta.get("epoch"), "model": meta.get("model"),
               "aggregation": config.aggregation, "load_size": sizes.load_size, "crop_size": sizes.crop_size,
               "view": sizes.view, "input_size": sizes.input_crop, "split": config.split, "results": results}
    distributed.run_on_main(_write_results, out, config, summary, rows, curves, meta)
    return {**summary, "out": str(out)}


def _check_out(out: Path, force: bool) -> None:
    if (out / "metrics.json").exists() and not force:
        raise InputError(f"{out}/metrics.json exists; pass --force to replace it or choose another --out")


def _write_results(out: Path, config: EvalConfig, summary: dict[str, Any], rows: list[dict[str, Any]],
                   curves: dict[str, Any], meta: dict[str, Any]) -> None:
    """metrics.json, metrics.csv, config.yaml and the PR curves (rank 0 under torchrun; the others wait for it)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", configs.to_yaml(config))
    write_json(out / "metrics.json", summary)
    append_csv(out / "metrics.csv", rows)
    plot_pr_curves(curves, out / "pr_curve.png", title=f"{meta.get('model')} ({config.aggregation})")


def warn_size_mismatch(trained: Any, load_size: int | None, crop_size: int | None,
                       logger: logging.Logger = log) -> bool:
    """One warning line, naming both, when the load/crop sizes images are scored at differ from those the
    classifier was trained at (its checkpoint's `config`); silent when they agree or were not recorded."""
    trained = trained if isinstance(trained, dict) else {}
    if "load_size" not in trained and "crop_size" not in trained:
        return False
    was = (trained.get("load_size"), trained.get("crop_size"))
    if (load_size, crop_size) == was:
        return False

    def sizes(load: int | None, crop: int | None) -> str:
        return f"load size {load or 'none'}, crop size {crop or 'none'}"

    logger.warning("classifier trained at %s but scored at %s (--load-size/--crop-size): its patches see the "
                   "images at another scale, so scores may not match its accuracy at its own size",
                   sizes(*was), sizes(load_size, crop_size))
    return True


def _run_dir(run: str) -> Path:
    path = Path(run)
    return path if path.is_dir() else path.parent


def printable_path(path: Path) -> str:
    """A path as valid UTF-8 text: a name's non-UTF-8 bytes (kept by Python as surrogates) become `\\xNN`."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _write_scores(path: Path, dataset: data.RealFakeDataset, scores: torch.Tensor, labels: torch.Tensor) -> None:
    """`scores_<test set>.csv`: one row per image (path, label 0 real / 1 fake, image P(fake) under the
    chosen aggregation), for the user to look up single images; `analysis.heatmaps.write_eval_heatmaps`
    ranks the easiest and hardest images by it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "score"])
    for path_, label, score in zip(map(dataset.path, range(len(dataset))), labels.tolist(), scores.tolist()):
        writer.writerow([printable_path(path_), label, f"{score:.6f}"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buffer.getvalue())
