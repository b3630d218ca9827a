"""Save and load classifier checkpoints: weights as `.safetensors`, metadata as JSON beside them.

Used by training (best/last snapshots, resume state), evaluation and every stage that loads a classifier.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from patchscope.common.atomic import atomic_open, write_bytes, write_json
from patchscope.common.errors import InputError
from patchscope.forensics.models import PatchClassifier, build_model

KIND = "patchscope-classifier"
FORMAT_VERSION = 1


def save_classifier(stem: str | Path, model: PatchClassifier, meta: dict[str, Any]) -> None:
    """Write `<stem>.safetensors` (weights and BN statistics) and `<stem>.json` (model name + meta)."""
    stem = Path(stem)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes(stem.with_suffix(".safetensors"), save_safetensors_bytes(tensors))
    write_json(stem.with_suffix(".json"), {"kind": KIND, "format_version": FORMAT_VERSION,
                                            "model": model.name, **meta})


CHECKPOINT_CHOICES = ("best", "last")  # which checkpoint of a run directory


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The `.safetensors` file meant by a run directory, a stem, or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{which}.safetensors"
    elif path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    elif path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    if not path.is_file():
        raise InputError(f"{path}: no classifier checkpoint here (expected a run directory "
                         f"with {which}.safetensors, or a .safetensors file with its .json)")
    return path


def load_classifier(path: str | Path, which: str = "best",
                    device: str | torch.device = "cpu") -> tuple[PatchClassifier, dict[str, Any]]:
    """Rebuild a classifier from its checkpoint; returns (model in eval mode, metadata)."""
    weights = resolve_checkpoint(path, which)
    meta_path = weights.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{meta_path}: missing or unreadable classifier metadata (JSON)") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise InputError(f"{meta_path}: not a patchscope classifier checkpoint")
    try:
        model = build_model(meta["model"])
    except (KeyError, ValueError) as err:
        raise InputError(f"{meta_path}: {err}") from None
    try:
        state = load_safetensors_bytes(weights.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{weights}: unreadable safetensors file ({err})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"{weights}: weights do not fit {meta['model']} ({first})") from None
    return model.to(device).eval(), meta


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Optimizer state and the training counters needed to continue a run (tensors and plain values).

    No RNG state is kept: batch order and augmentation derive from (seed, epoch, index) alone
    (forensics.batching, forensics.data), so a resumed run draws what an uninterrupted one would.
    """
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no resume state; the run cannot be continued") from None
    except Exception as err:  # a torn or foreign file: name it, never execute it
        raise InputError(f"{path}: unreadable resume state ({type(err).__name__})") from None
