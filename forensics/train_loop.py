"""Pieces of the classifier training loop that `forensics.train` uses: one epoch of steps, runs saved before epoch
commits, the TensorBoard writer.

Under torchrun each rank trains on its share of every global batch; the epoch's loss and accuracy are summed over
the ranks, so the log line is the one of the whole epoch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from patchscope.common import distributed
from patchscope.common.device import autocast
from patchscope.common.errors import InputError
from patchscope.common.labels import fake_wins
from patchscope.common.progress import progress_bar
from patchscope.forensics import checkpoint, data, epoch_commit
from patchscope.forensics.device_crop import to_device_batch
from patchscope.forensics.scoring import patch_cross_entropy

RESUME_FILE = "resume.pt"


def _adopt_earlier_run(out: Path) -> None:
    """A run saved before epoch commits existed: commit its files as they are when `last`, `best` and the resume
    state agree on the epochs, else refuse it (it was stopped between two of them)."""
    state = checkpoint.load_resume_state(out / RESUME_FILE)["state"]
    found = {"last.json": _saved_epoch(out / "last.json"), "best.json": _saved_epoch(out / "best.json")}
    if found != {"last.json": state["epoch"], "best.json": state["best_epoch"]}:
        raise InputError(f"{out}: an epoch was cut short while being saved ({RESUME_FILE} is at epoch {state['epoch']}"
                         f", best {state['best_epoch']}; last.json at {found['last.json']}, best.json at "
                         f"{found['best.json']}); it cannot be continued: start a new run in another --out")
    epoch_commit.adopt(out, state["epoch"], ["best.safetensors", "best.json", "last.safetensors", "last.json",
                                             RESUME_FILE])


def _saved_epoch(path: Path) -> int:
    """The epoch a checkpoint's metadata names; 0 when there is no such file (a `best` never saved)."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return -1
    return meta.get("epoch", -1) if isinstance(meta, dict) else -1


def _train_epoch(model, optimizer, loader, epoch, device, precision, memory_format,
                 loss_function=patch_cross_entropy) -> dict[str, Any]:
    model.train()
    data.set_epoch(loader, epoch)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    patches = images = 0
    start = time.perf_counter()
    for batch in progress_bar(loader, desc=f"train epoch {epoch}", unit="batch", leave=False):
        x, y, _ = to_device_batch(batch, device, memory_format)  # host or device crops (forensics.device_crop)
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        loss = loss_function(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device: no host sync per step.
        total_loss += loss.detach() * len(y)
        correct += (fake_wins(logits).long() == y[:, None, None]).sum()
        patches += logits[:, 0].numel()
        images += len(y)
    seconds = time.perf_counter() - start
    totals = distributed.all_reduce_sum(torch.stack([total_loss.double(), correct.double(),
                                                     torch.tensor(float(patches), device=device, dtype=torch.float64),
                                                     torch.tensor(float(images), device=device, dtype=torch.float64)]))
    total_loss, correct, patches, images = totals[0], totals[1], int(totals[2].item()), int(totals[3].item())
    return {"epoch": epoch, "train_loss": total_loss.item() / max(images, 1),
            "train_patch_acc": correct.item() / max(patches, 1), "images": images,
            "seconds": round(seconds, 3), "images_per_s": round(images / max(seconds, 1e-9), 2),
            "lr": optimizer.param_groups[0]["lr"]}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install 'patchscope[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
