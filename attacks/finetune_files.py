"""Files of a finetuning run beside its generator checkpoint (`generators.io.writers`): the networks'
state for resume, the resume state and the metrics log. Used by attacks.finetune.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchscope.common.atomic import write_text
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import load_resume_state, save_resume_state
from patchscope.generators.io.writers import plain_tensors

GENERATOR_FILE = "generator.pt"  # written by generators.io.writers.save_generator_checkpoint
RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.jsonl"
RESUME_KIND = "patchscope-finetune-resume"
def network_state(module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict plus the buffers it leaves out (StyleGAN2's `w_avg` is not persistent)."""
    state = plain_tensors(module)
    extra = {k: v.detach().cpu().clone() for k, v in module.named_buffers()
             if k not in state and not k.startswith("discriminator.")}
    return {"state": state, "buffers": extra}


def load_network_state(module: nn.Module, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    module.load_state_dict(saved["state"], strict=True)
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in saved["buffers"].items():
            buffers[name].copy_(value)


def save_resume(out: Path, state: dict[str, Any]) -> None:
    save_resume_state(out / RESUME_FILE, {"kind": RESUME_KIND, **state})


def load_resume(out: Path) -> dict[str, Any]:
    """The resume state in OUT (read with `weights_only`), or an InputError naming the file."""
    state = load_resume_state(out / RESUME_FILE)
    if not isinstance(state, dict) or state.get("kind") != RESUME_KIND:
        raise InputError(f"{out / RESUME_FILE}: not the resume state of a finetuning run")
    return state


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines up to `step` (a resumed run repeats the steps after it); returns them."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in kept if record.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept
