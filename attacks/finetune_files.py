"""Files of a finetuning run beside its generator checkpoint (`generators.io.writers`): the networks'
state for resume, the resume state and the metrics log. Used by attacks.finetune.

A checkpoint (generator.pt and resume.pt) is saved as one commit (`forensics.epoch_commit`, counted in steps):
both files are staged in `.staged/`, `checkpoint.json` (the step and the SHA-256 of both) is renamed into place,
then they are moved beside it. `recover` leaves the folder as the last commit says: a kill before that rename
resumes from the checkpoint before, a kill after it finishes the moves, and log lines of later steps are dropped.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscope.common.errors import InputError
from patchscope.forensics import epoch_commit
from patchscope.forensics.checkpoint import load_resume_state, resume_state_bytes
from patchscope.generators.io.writers import file_name, plain_tensors, save_generator_checkpoint

GENERATOR_FILE = "generator.pt"  # written by generators.io.writers.save_generator_checkpoint
MODULE_GENERATOR_FILE = "generator.safetensors"  # the same, for a MODULE:CALLABLE generator (`file_name`)
GENERATOR_FILES = (GENERATOR_FILE, MODULE_GENERATOR_FILE)
RESUME_FILE = "resume.pt"
METRICS_FILE = epoch_commit.LOG
MANIFEST_FILE = epoch_commit.MANIFEST  # the commit point of the last checkpoint
STAGING_FOLDER = epoch_commit.STAGING  # a checkpoint's files until they are committed
COUNTER = "step"                       # what the commits count
RESUME_KIND = "patchscope-finetune-resume"


def network_state(module: nn.Module | None) -> dict[str, dict[str, torch.Tensor]] | None:
    """The state dict plus the buffers it leaves out (StyleGAN2's `w_avg` is not persistent); None for no module."""
    if module is None:
        return None
    state = plain_tensors(module)
    extra = {k: v.detach().cpu().clone() for k, v in module.named_buffers()
             if k not in state and not k.startswith("discriminator.")}
    return {"state": state, "buffers": extra}


def load_network_state(module: nn.Module | None, saved: dict[str, dict[str, torch.Tensor]] | None) -> None:
    if module is None or saved is None:
        return
    module.load_state_dict(saved["state"], strict=True)
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in saved["buffers"].items():
            buffers[name].copy_(value)


def commit_checkpoint(out: Path, step: int, average: nn.Module, trained: nn.Module, discriminator: nn.Module | None,
                      state: dict[str, Any]) -> None:
    """Save generator.pt (the generator's own format; generator.safetensors for MODULE:CALLABLE) and resume.pt
    (`state`) of step `step` as one commit."""
    files = {file_name(average): lambda path: save_generator_checkpoint(path, average, trained, discriminator),
             RESUME_FILE: resume_state_bytes({"kind": RESUME_KIND, **state})}
    epoch_commit.commit(out, step, files, None, counter=COUNTER)


def recover(out: Path) -> int | None:
    """Leave OUT as its last commit says (see the module) and return that commit's step; None when nothing was
    committed (then nothing in OUT counts: `forget` clears it)."""
    manifest = epoch_commit.recover(out, counter=COUNTER)
    return None if manifest is None else manifest[COUNTER]


def committed(out: Path) -> bool:
    """Whether OUT holds a committed checkpoint."""
    return epoch_commit.read_manifest(out, counter=COUNTER) is not None


def forget(out: Path) -> None:
    """Start OUT afresh: the commit goes first (from then on nothing in OUT counts), then its files and the log."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    if (out / STAGING_FOLDER).is_dir():
        epoch_commit.remove_tree(out / STAGING_FOLDER)
    for name in (RESUME_FILE, *GENERATOR_FILES, METRICS_FILE):
        (out / name).unlink(missing_ok=True)


def log_records(out: Path) -> list[dict[str, Any]]:
    """The records of OUT's metrics log."""
    return epoch_commit.log_lines(out / METRICS_FILE)


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines up to `step` (a resumed run repeats the steps after it); returns them."""
    epoch_commit.settle_log(path, {COUNTER: step}, COUNTER)
    return epoch_commit.log_lines(path)


def load_resume(out: Path) -> dict[str, Any]:
    """The resume state in OUT (read with `weights_only`), or an InputError naming the file.

    Its string keys are interned, as the names of a live optimizer's and the finetuner's state are: a checkpoint
    saved after a resume then pickles to the bytes an uninterrupted run's does.
    """
    state = load_resume_state(out / RESUME_FILE)
    if not isinstance(state, dict) or state.get("kind") != RESUME_KIND:
        raise InputError(f"{out / RESUME_FILE}: not the resume state of a finetuning run")
    return _interned(state)


def _interned(value: Any) -> Any:
    if isinstance(value, dict):
        return type(value)((sys.intern(k) if isinstance(k, str) else k, _interned(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_interned(v) for v in value)
    return value
