"""Save and load classifier checkpoints: weights as `.safetensors`, metadata as JSON beside them.

Used by training (best/last snapshots, resume state), evaluation and every stage that loads a classifier.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from patchscope.common.atomic import write_bytes
from patchscope.common.errors import InputError
from patchscope.common.userfiles import read_json, read_regular
from patchscope.forensics.models import PatchClassifier, build_model

KIND = "patchscope-classifier"
FORMAT_VERSION = 1


def classifier_files(stem: str | Path, model: PatchClassifier, meta: dict[str, Any]) -> dict[str, bytes]:
    """The contents of `<stem>.safetensors` (weights and BN statistics) and `<stem>.json` (model name + meta),
    by file name: what `save_classifier` writes, for a caller that commits them with other files."""
    stem = Path(stem)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"kind": KIND, "format_version": FORMAT_VERSION, "model": model.name, **meta}
    return {stem.with_suffix(".safetensors").name: save_safetensors_bytes(tensors),
            stem.with_suffix(".json").name: (json.dumps(header, indent=2, allow_nan=True) + "\n").encode()}


def save_classifier(stem: str | Path, model: PatchClassifier, meta: dict[str, Any]) -> None:
    """Write `<stem>.safetensors` and `<stem>.json` (see `classifier_files`), each atomically."""
    stem = Path(stem)
    for name, contents in classifier_files(stem, model, meta).items():
        write_bytes(stem.parent / name, contents)


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
    meta = read_metadata(meta_path)
    try:
        model = build_model(meta["model"])
    except (KeyError, ValueError) as err:
        raise InputError(f"{meta_path}: {err}") from None
    # The file holds this model's tensors and a header: a larger one (a sparse multi-GiB file) is refused unread.
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = min(MAX_WEIGHTS_BYTES, 2 * needed + (1 << 20))
    try:
        state = load_safetensors_bytes(read_regular(weights, "classifier weights (.safetensors)", limit))
    except InputError:  # not a regular file, or larger than the model: already one line naming the file
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{weights}: unreadable safetensors file ({err})") from None
    # NaN or infinite weights would only surface deep inside scoring (sklearn: "Input contains NaN").
    broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if broken is not None:
        raise InputError(f"{weights}: {broken} holds NaN or infinite values; expected finite classifier weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"{weights}: weights do not fit {meta['model']} ({first})") from None
    return model.to(device).eval(), meta


MAX_METADATA_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 4 << 30
MAX_SAVED_SIZE = 8192  # load/crop sizes a checkpoint may name: larger ones exhaust memory at the first image


def _is_size(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SAVED_SIZE)


def read_metadata(meta_path: Path) -> dict[str, Any]:
    """A classifier checkpoint's JSON metadata, checked field by field before anything uses it."""
    if not meta_path.exists():
        raise InputError(f"{meta_path}: missing classifier metadata (JSON)")
    meta = read_json(meta_path, "a patchscope classifier's metadata (JSON)", limit=MAX_METADATA_BYTES)
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise InputError(f"{meta_path}: not a patchscope classifier checkpoint")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise InputError(f"{meta_path}: format_version {version!r}; this patchscope reads classifier checkpoints "
                         f"of version 1 to {FORMAT_VERSION} (a newer patchscope wrote it?)")
    if not isinstance(meta.get("model"), str):
        raise InputError(f"{meta_path}: 'model' is {meta.get('model')!r:.60}; expected a model name")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise InputError(f"{meta_path}: 'config' is a {type(config).__name__}; expected the mapping of "
                         "training settings")
    for key in ("load_size", "crop_size"):
        if not _is_size(config.get(key)):
            raise InputError(f"{meta_path}: config {key}={config.get(key)!r:.40}; expected an integer "
                             f"from 1 to {MAX_SAVED_SIZE} or null")
    return meta


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Optimizer state and the training counters needed to continue a run (tensors and plain values).

    No RNG state is kept: batch order and augmentation derive from (seed, epoch, index) alone
    (forensics.batching, forensics.data), so a resumed run draws what an uninterrupted one would.
    """
    write_bytes(path, resume_state_bytes(state))


def resume_state_bytes(state: dict[str, Any]) -> bytes:
    """The contents of a resume state file (see `save_resume_state`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_resume_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no resume state; the run cannot be continued") from None
    except Exception as err:  # a torn or foreign file: name it, never execute it
        raise InputError(f"{path}: unreadable resume state ({type(err).__name__})") from None
