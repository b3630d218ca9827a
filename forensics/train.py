"""The classifier training loop: patch-wise cross entropy (or the model's own loss), Adam, early stopping, resume.

`fit(TrainConfig)` is what `patchscope train` runs; the retrain stage of the attacks calls it too.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from patchscope.common import config as configs
from patchscope.common import distributed, runfolder
from patchscope.common.checks import check_bool, check_choice, check_float, check_int, check_text
from patchscope.common.device import PRECISIONS, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.runfolder import RunFolder
from patchscope.forensics import checkpoint, data, distributed_train, epoch_commit, pretrained
from patchscope.forensics.augment import PRESETS, Augmentation, preset_probability
from patchscope.common.compiled import maybe_compile
from patchscope.forensics.device_crop import CROP_ON
from patchscope.forensics.evaluate import predict
from patchscope.forensics.losses import loss_for
from patchscope.forensics.models import INITS, build_model, model_names
from patchscope.forensics.receptive import receptive_field
from patchscope.forensics.scoring import compute_metrics
from patchscope.forensics.train_loop import (RESUME_FILE, _adopt_earlier_run, _saved_epoch,  # noqa: F401 (moved)
                                             _tensorboard, _train_epoch)

log = logging.getLogger("patchscope.train")

# Early-stopping patience of the public code, in epochs; other models use DEFAULT_PATIENCE.
MODEL_PATIENCE = {"xception_block1": 50, "xception_block2": 20}
DEFAULT_PATIENCE = 10
# Early-stopping rules (TrainConfig.early_stopping); see `stop_reason`.
EARLY_STOPPING = ("patience", "public")
PUBLIC_PATIENCE_FACTOR = 5  # the public code stops once more than 5 x patience epochs passed since the best
# Settings a resumed run may change; everything else must match the saved config.
RESUMABLE_CHANGES = {"max_epochs", "patience", "early_stopping", "device", "workers", "crop_on", "tensorboard",
                     "eval_batch_size", "store", "world_size"}
RUN_FOLDER = RunFolder(holds="a run", resumable=RESUMABLE_CHANGES, force_to=None)


@dataclass
class TrainConfig:
    real: str = ""                  # real images: folder with train/ and val/, a flat folder, or a manifest
    fake: str = ""                  # fake images, same layouts
    out: str = ""                   # run directory (created; an existing run is resumed or refused)
    model: str = "xception_block2"  # registered patch classifier name
    load_size: int | None = 299     # Lanczos-resize the shorter side to this, once, at load time
    crop_size: int | None = 299     # random crop when training, centre crop for validation
    init: str = "xavier"            # xavier (the paper's: gain 0.02) | kaiming (PyTorch default)
    init_weights: str | None = None  # start the backbone from this file (torchvision .pth, .safetensors)
    augment: str = "none"           # none | blur_jpeg_0.1 | blur_jpeg_0.5: Wang et al.'s Blur+JPEG (p)
    blur_prob: float | None = None  # P(Gaussian blur, sigma ~ U[0, 3]) per training image (None: augment's p)
    jpeg_prob: float | None = None  # P(JPEG, quality ~ U{30..100}) per training image (None: augment's p)
    random_resized_crop: bool = False  # random area and aspect resized to crop_size, instead of a plain crop
    flip: bool = True               # random horizontal flips of training images
    batch_size: int = 32            # images per step (the global batch under torchrun): half real, half fake
    lr: float = 1e-3                # Adam learning rate
    beta1: float = 0.9              # Adam betas
    beta2: float = 0.999
    max_epochs: int = 1000          # hard limit on epochs
    patience: int | None = None     # epochs without a new best val patch accuracy before stopping (None: per model)
    early_stopping: str = "patience"  # patience | public (the public code's rule); see stop_reason
    seed: int = 0                   # initial weights, batch order and augmentation all derive from it
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    channels_last: bool = True      # NHWC memory layout: faster convolutions on CPU and GPU
    compile: bool = False           # torch.compile the model
    workers: int | None = None      # DataLoader worker processes (None: 0 when cached, else up to 8)
    crop_on: str = "auto"           # auto | host | device: where crops, flips and scaling run (forensics.device_crop)
    cache: bool | None = None       # keep decoded images in memory (None: when they fit in 4 GiB)
    store: str | None = None        # prepared image store folder (forensics.store): decode and resize once
    on_bad_image: str = "skip"      # skip | error for unreadable images
    train_split: str = "train"      # split folder names
    val_split: str = "val"
    eval_batch_size: int = 64       # batch size for validation
    tensorboard: bool = False       # also log to TensorBoard (needs the tensorboard extra)
    sync_bn: bool = False           # torchrun: BatchNorm statistics over the global batch, not each rank's share
    world_size: int | None = None   # processes (torchrun); set by fit from the launch and recorded, not a choice

    def __post_init__(self) -> None:
        for name in ("real", "fake", "out", "train_split", "val_split", "device"):
            check_text(self, name)
        check_choice(self, "model", model_names())
        check_int(self, "load_size", 1, checkpoint.MAX_SAVED_SIZE, optional=True)  # what a checkpoint may name
        check_int(self, "crop_size", 1, checkpoint.MAX_SAVED_SIZE, optional=True)
        check_choice(self, "init", INITS)
        check_text(self, "init_weights", optional=True)
        check_choice(self, "augment", tuple(PRESETS))
        check_float(self, "blur_prob", 0, 1, optional=True)
        check_float(self, "jpeg_prob", 0, 1, optional=True)
        check_int(self, "batch_size", 2, even=True)  # half real, half fake
        check_float(self, "lr", 0, low_open=True)
        check_float(self, "beta1", 0, 1, high_open=True)
        check_float(self, "beta2", 0, 1, high_open=True)
        check_int(self, "max_epochs", 1)
        check_int(self, "patience", 1, optional=True)
        check_choice(self, "early_stopping", EARLY_STOPPING)
        check_int(self, "seed", 0)
        check_choice(self, "precision", PRECISIONS)
        for name in ("channels_last", "compile", "tensorboard", "random_resized_crop", "flip", "sync_bn"):
            check_bool(self, name)
        check_int(self, "workers", 0, optional=True)
        check_choice(self, "crop_on", CROP_ON)
        check_bool(self, "cache", optional=True)
        check_text(self, "store", optional=True)
        check_choice(self, "on_bad_image", data.BAD_IMAGE_POLICIES)
        check_int(self, "eval_batch_size", 1)
        check_int(self, "world_size", 1, optional=True)

    def augmentation(self) -> Augmentation:
        """What training images go through: the preset's p for blur and JPEG unless given on their own."""
        p = preset_probability(self.augment)
        return Augmentation(p if self.blur_prob is None else float(self.blur_prob),
                            p if self.jpeg_prob is None else float(self.jpeg_prob), self.random_resized_crop, self.flip)


def patience_for(config: TrainConfig) -> int:
    return config.patience if config.patience is not None else MODEL_PATIENCE.get(config.model, DEFAULT_PATIENCE)


def stop_reason(config: TrainConfig, epoch: int, since_best: int, best_acc: float) -> str | None:
    """Why training stops after `epoch` (None: go on), given the epochs `since_best` the best validation patch
    accuracy `best_acc`: the one decision of `Training.advance` and of `Training.restore`'s reopen check.
    max_epochs is a hard limit; `patience`: stop after `patience` epochs without a strictly higher accuracy;
    `public` (patch-forensics' train.py): after more than 5 x patience, or one epoch after the best reached 1.0."""
    patience = patience_for(config)
    if epoch >= config.max_epochs:
        return f"reached max_epochs={config.max_epochs}"
    if config.early_stopping == "patience":
        return f"no improvement for {patience} epochs" if since_best >= patience else None
    if since_best > PUBLIC_PATIENCE_FACTOR * patience:
        return f"no improvement for {since_best} epochs, more than 5 x patience (early_stopping=public)"
    if best_acc >= 1.0 and since_best >= 1:
        return f"validation patch accuracy reached 1.0 at epoch {epoch - since_best} (early_stopping=public)"
    return None


def cache_fits(n_images: int, size: int | None, limit_bytes: float = 4 * 2**30) -> bool:
    return size is not None and n_images * size * size * 3 <= limit_bytes


def _load_split(config: TrainConfig, split: str, train: bool, min_size: int,
                device_type: str = "cpu") -> tuple[data.RealFakeDataset, int]:
    """The dataset of one split and the DataLoader worker count that suits it."""
    cache = config.cache
    if cache is None:
        n = len(data.list_images(config.real, split)) + len(data.list_images(config.fake, split))
        cache = cache_fits(n, config.load_size)
    # Cached images only need cropping and flipping: worker processes would cost more than they save,
    # unless blur and JPEG (CPU work per image) would hold up a GPU.
    augmentation = config.augmentation() if train else None
    light = cache and not (augmentation is not None and augmentation.degrades and device_type == "cuda")
    workers = config.workers if config.workers is not None else (0 if light else 8)
    dataset = data.load_split(config.real, config.fake, split, load_size=config.load_size,
                              crop_size=config.crop_size, min_size=min_size,
                              on_bad_image=config.on_bad_image, cache=cache, workers=workers,
                              train=train, seed=config.seed, augmentation=augmentation, store=config.store)
    return dataset, workers


def fit(config: TrainConfig, resume: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train a patch classifier; returns a summary (best epoch, best val patch accuracy, run dir).

    Early stopping: after every epoch the model scores the validation split (centre crops)
    and its patch accuracy is compared with the best so far. A strictly higher accuracy
    saves `best` and resets the count; otherwise the count of epochs without improvement
    grows, and `stop_reason` decides by `config.early_stopping` whether training stops.
    `last`, the resume state, `best` when it improved and the epoch's metrics line are saved
    after every epoch as one commit (`forensics.epoch_commit`); a resume continues the last one.
    Under torchrun every rank calls it: each trains on its share of the global batch (DistributedDataParallel),
    validation is sharded and gathered, and rank 0 alone writes the run folder (`forensics.distributed_train`).
    """
    run = Training(distributed_train.with_world_size(config))
    run.claim(resume)
    try:
        run.build()
        run.restore()
        if run.state["finished"]:
            log.info("%s: training already finished (%s)", run.out, run.state.get("stop_reason"))
            return run.summary()
        run.start()
        for epoch in range(run.state["epoch"] + 1, config.max_epochs + 1):
            record = run.train_epoch(epoch)
            val = run.validate()
            improved = run.advance(epoch, record, val)
            run.commit(epoch, record, val, improved)
            run.report(epoch, record, val, improved)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if run.state["finished"]:
                log.info("stopped after epoch %d: %s", epoch, run.state["stop_reason"])
                break
        distributed.barrier()  # every rank returns once rank 0 has saved the last epoch
        return run.summary()
    finally:
        run.finish()


class Training:
    """One call of `fit`, step by step: `claim` the run folder, `build` the model, optimizer and data, `restore`
    the last committed epoch, `start` the loaders; per epoch `train_epoch`, `validate`, `advance` the counters,
    `commit` the epoch's files, `report` it; `finish` lets the folder go. `state` is where the run stands."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = distributed.setup(resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device)
        configure_backends(self.device)
        self.patience = patience_for(config)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.state: dict[str, Any] = {"epoch": 0, "best_acc": -math.inf, "best_epoch": 0, "since_best": 0,
                                      "finished": False}
        self.out: Path | None = None
        self.writer = None
        self.init_tensors: dict[str, torch.Tensor] | None = None

    def claim(self, resume: bool) -> None:
        """Refuse or hold the run folder and record the settings (an existing run only with `resume`)."""
        if not self.config.out:
            raise InputError("no run directory given (--out)")
        self.init_tensors = self._read_init_weights(resume)  # a file that does not fit leaves no folder behind
        # rank 0 alone claims and writes the folder; its refusal reaches every rank, so none waits for it
        self.out = distributed.run_on_main(RUN_FOLDER.claim, self.config.out, self.config, resume=resume)

    def _read_init_weights(self, resume: bool) -> dict[str, torch.Tensor] | None:
        """The --init-weights tensors, checked against the model; None without the option or when a resumed run
        has a committed epoch, whose weights replace them."""
        config, out = self.config, Path(self.config.out)
        if not config.init_weights or (resume and ((out / epoch_commit.MANIFEST).exists()
                                                   or (out / RESUME_FILE).exists())):
            return None
        with torch.device("meta"):  # shapes only
            shapes = build_model(config.model)
        return pretrained.load_init_weights(shapes, config.init_weights)

    def build(self) -> None:
        """The model (on the device), its optimizer, and the training and validation data."""
        config = self.config
        model = build_model(config.model, seed=config.seed, init=config.init)
        if self.init_tensors:
            pretrained.apply_init_weights(model, self.init_tensors)
            self.init_tensors = None
        if config.sync_bn:
            model = distributed_train.sync_batchnorm(model, self.device)
        self.loss = loss_for(model)
        rf = receptive_field(model)
        # An image smaller than one receptive field cannot be judged patch by patch (the crop caps
        # the check: deep blocks at small sizes see the whole input from every cell, as in the paper).
        min_size = min(rf.size, config.crop_size or config.load_size or rf.size)
        if config.crop_size and config.crop_size < rf.size and not model.whole_image:
            log.warning("%s sees %d px per output cell, more than its %d px input: every cell sees the "
                        "whole image", config.model, rf.size, config.crop_size)
        self.train_set, self.train_workers = _load_split(config, config.train_split, True, min_size, self.device.type)
        self.val_set, self.val_workers = _load_split(config, config.val_split, False, min_size)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))

    def restore(self) -> None:
        """Continue from the last committed epoch, if any: a half-saved one is rolled back or forward first."""
        out = self.out
        if distributed.run_on_main(_recover, out) is None:  # rank 0 settles the folder; then every rank loads it
            return
        saved = checkpoint.load_resume_state(out / RESUME_FILE)
        last, _ = checkpoint.load_classifier(out, "last")
        self.model.load_state_dict(last.state_dict())
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = state = saved["state"]
        log.info("resuming %s after epoch %d", out, state["epoch"])
        if state["finished"] and self.stop_reason() is None:  # a limit raised or the rule changed on resume: go on
            log.info("continuing past %s (now max_epochs=%d, patience=%d, early_stopping=%s)",
                     state.get("stop_reason"), self.config.max_epochs, self.patience, self.config.early_stopping)
            state.update(finished=False, stop_reason=None)
        elif not state["finished"] and (reason := self.stop_reason()) is not None:  # a limit lowered on resume
            log.info("stopping at epoch %d: %s", state["epoch"], reason)
            state.update(finished=True, stop_reason=reason)

    def stop_reason(self) -> str | None:
        """`stop_reason` of the settings after the epoch `state` is at; None to go on."""
        return stop_reason(self.config, self.state["epoch"], self.state["since_best"], self.state["best_acc"])

    def start(self) -> None:
        """The compiled model (if asked), the data loaders and the TensorBoard writer."""
        config, device_type = self.config, self.device.type
        step_model = distributed_train.wrap(self.model, self.device)
        # a compiler that cannot run here (or fails) leaves the model eager, after one warning
        self.step_model = maybe_compile(step_model, config.compile, self.device, "the classifier")
        # validation calls the module itself: DDP's forward would wait for a backward that never comes
        self.eval_model = self.step_model if step_model is self.model else maybe_compile(
            self.model, config.compile, self.device, "the classifier (validation)")
        shard = {"rank": distributed.rank(), "world_size": distributed.world_size()}
        self.train_loader = data.make_loader(self.train_set, distributed_train.per_rank_batch(config), train=True,
                                             seed=config.seed, workers=self.train_workers, device_type=device_type,
                                             crop_on=config.crop_on, **shard)
        self.val_loader = data.make_loader(self.val_set, config.eval_batch_size, train=False, seed=config.seed,
                                           workers=self.val_workers, device_type=device_type,
                                           crop_on=config.crop_on, **shard)
        self.writer = _tensorboard(self.out) if config.tensorboard and distributed.is_main() else None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        return _train_epoch(self.step_model, self.optimizer, self.train_loader, epoch, self.device,
                            self.precision, self.memory_format, self.loss)

    def validate(self) -> dict[str, Any]:
        """Metrics of the validation split, scored on centre crops."""
        distributed_train.sync_buffers(self.model)
        probs, labels = predict(self.eval_model, self.val_loader, self.device, self.precision, self.memory_format,
                                gather=True)
        return compute_metrics(probs.mean(dim=(1, 2)), labels, patch_probs=probs)

    def advance(self, epoch: int, record: dict[str, Any], val: dict[str, Any]) -> bool:
        """Count the epoch towards early stopping and complete its log record; returns whether it is the best."""
        state = self.state
        improved = val["patch_acc"] > state["best_acc"]
        state.update(epoch=epoch, since_best=0 if improved else state["since_best"] + 1)
        if improved:
            state.update(best_acc=val["patch_acc"], best_epoch=epoch)
        reason = self.stop_reason()
        if reason is not None:
            state.update(finished=True, stop_reason=reason)
        record.update(val_patch_acc=val["patch_acc"], val_ap=val["ap"], val_acc=val["acc"],
                      best_val_patch_acc=state["best_acc"], best_epoch=state["best_epoch"],
                      epochs_since_best=state["since_best"])
        return improved

    def commit(self, epoch: int, record: dict[str, Any], val: dict[str, Any], improved: bool) -> None:
        """Save the epoch's `last`, resume state, `best` (when improved) and log line as one commit (rank 0)."""
        if not distributed.is_main():
            return
        meta = {"epoch": epoch, "config": configs.to_dict(self.config), "world_size": self.config.world_size,
                "val": val}
        files = checkpoint.classifier_files("best", self.model, meta) if improved else {}
        files.update(checkpoint.classifier_files("last", self.model, meta))
        files[RESUME_FILE] = checkpoint.resume_state_bytes({"optimizer": self.optimizer.state_dict(),
                                                            "state": self.state})
        epoch_commit.commit(self.out, epoch, files, record)

    def report(self, epoch: int, record: dict[str, Any], val: dict[str, Any], improved: bool) -> None:
        if not distributed.is_main():
            return
        log.info("epoch %d: loss %.4f, train patch acc %.4f, val patch acc %.4f, val AP %.4f%s",
                 epoch, record["train_loss"], record["train_patch_acc"], val["patch_acc"], val["ap"],
                 " (best)" if improved else "")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, epoch)

    def finish(self) -> None:
        """Close the TensorBoard writer and let another process have the run folder."""
        if self.writer is not None:
            self.writer.close()
        if self.out is not None and distributed.is_main():
            runfolder.release(self.out)

    def summary(self) -> dict[str, Any]:
        state = self.state
        return {"run": str(self.out), "epochs": state["epoch"], "best_epoch": state["best_epoch"],
                "best_val_patch_acc": state["best_acc"], "finished": state["finished"],
                "stop_reason": state.get("stop_reason")}


def _recover(out: Path) -> dict[str, Any] | None:
    """The folder as its last commit says (a run saved before epoch commits adopted first); its manifest or None."""
    if epoch_commit.read_manifest(out) is None and (out / RESUME_FILE).exists():
        _adopt_earlier_run(out)
    return epoch_commit.recover(out)
