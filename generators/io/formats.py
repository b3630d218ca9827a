"""Which public checkpoint format a file holds, and `load_generator` that reads any of them safely.

Used by the CLI, sampling and the attacks: one call turns a path into a `Generator`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchscope.common.errors import CheckpointError
from patchscope.common.userfiles import check_regular, read_json
from patchscope.generators.base import Generator
from patchscope.generators.glow.y0ast import load_glow_y0ast
from patchscope.generators.io.safe_pickle import PickledRecord, is_zip_file, load_pickle, load_torch
from patchscope.generators.pgan.tf import load_pgan_tf, load_pgan_tf_torch
from patchscope.generators.pgan.zoo import load_pgan_zoo
from patchscope.generators.stylegan.tf import load_stylegan_tf, load_stylegan_tf_torch
from patchscope.generators.stylegan2.model import load_rosinality
from patchscope.generators.stylegan2.nvlabs import load_nvlabs

PERSISTENT_CONSTRUCTOR = "torch_utils.persistence._reconstruct_persistent_obj"


@dataclass(frozen=True)
class Format:
    """A checkpoint format and the function that builds its generator from the file's contents."""

    name: str
    loader: Callable[..., Generator]
    description: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pgan_zoo", load_pgan_zoo, "pytorch_GAN_zoo PGAN .pt {config, netG, netD, avgG}"),
    Format("pgan_tf", load_pgan_tf, "official TF PGAN pickle (G, D, Gs)"),
    Format("pgan_tf_torch", load_pgan_tf_torch,
           "a TF PGAN finetuned by patchscope: .pt {format, G, D, Gs} of TF variables"),
    Format("stylegan_tf", load_stylegan_tf, "official TF StyleGAN pickle (G, D, Gs)"),
    Format("stylegan_tf_torch", load_stylegan_tf_torch,
           "a TF StyleGAN finetuned by patchscope: .pt {format, G, D, Gs} of TF variables"),
    Format("sg2_rosinality", load_rosinality, "rosinality StyleGAN2 .pt with g_ema"),
    Format("sg2_nvlabs", load_nvlabs, "NVlabs stylegan2-ada / stylegan3 network pickle with G_ema"),
    Format("glow_y0ast", load_glow_y0ast, "y0ast Glow-PyTorch state dict"),
)}


def _formats_understood() -> str:
    # names only: each message stays one short line; the README's Generators section describes each format
    return "formats understood: " + ", ".join(FORMATS)


def _is_tf_networks(obj: Any) -> bool:
    return isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(n, PickledRecord) for n in obj)


def _glow_state(obj: Any) -> Mapping[str, Any] | None:
    """The y0ast Glow state dict in `obj` (bare, or under `model` as its training checkpoints save it)."""
    for candidate in (obj, obj.get("model") if isinstance(obj, Mapping) else None):
        if isinstance(candidate, Mapping) and any(str(k).startswith("flow.layers.") for k in candidate) \
                and ("prior_h" in candidate or any(str(k).startswith("learn_top") for k in candidate)):
            return candidate
    return None


def detect_format(obj: Any) -> str | None:
    """The `FORMATS` name of a safely loaded checkpoint object, or None when it is none of them."""
    if isinstance(obj, Mapping):
        if obj.get("format") == "patchscope_pgan_tf":
            return "pgan_tf_torch"
        if obj.get("format") == "patchscope_stylegan_tf":
            return "stylegan_tf_torch"
        net_g = obj.get("netG")
        if {"netG", "netD"} <= set(obj) and isinstance(net_g, Mapping) and "formatLayer.module.weight" in net_g:
            return "pgan_zoo"
        g_ema = obj.get("g_ema")
        if isinstance(g_ema, Mapping) and "style.1.weight" in g_ema:
            return "sg2_rosinality"
        nvlabs = obj.get("G_ema")
        if isinstance(nvlabs, PickledRecord) and nvlabs.qualname == PERSISTENT_CONSTRUCTOR:
            return "sg2_nvlabs"
        if _glow_state(obj) is not None:
            return "glow_y0ast"
        return None
    if _is_tf_networks(obj):
        gs = obj[2]
        if gs.attr("build_func_name") == "G_paper":
            return "pgan_tf"
        components = gs.attr("components")
        if gs.attr("build_func_name") == "G_style" or (
                isinstance(components, Mapping) and {"mapping", "synthesis"} <= set(components)):
            return "stylegan_tf"
    return None


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
    return digest.hexdigest()


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= length <= min(size - 8, 100 << 20):
            return False
        header = handle.read(length)
    try:
        return isinstance(json.loads(header), dict)
    except ValueError:
        return False


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The safely loaded object in a checkpoint file (torch zip or pickle), nothing executed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_regular(path, "a generator checkpoint", CheckpointError)  # a FIFO would block the reads below
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a generator checkpoint; {_formats_understood()}")
    if _looks_like_safetensors(path):
        raise CheckpointError(f"{path}: a safetensors file (a classifier?), not a generator checkpoint; "
                              f"{_formats_understood()}")
    loader = load_torch if is_zip_file(path) else load_pickle
    try:
        return loader(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_formats_understood()}") from error


def _sibling_hparams(path: Path) -> dict[str, Any] | None:
    """y0ast Glow keeps its hyper-parameters in a JSON file beside the weights."""
    for candidate in (path.with_name(f"{path.stem}_hparams.json"), path.with_name("hparams.json")):
        if candidate.exists():
            return read_json(candidate, "the y0ast Glow hparams (a JSON object)", CheckpointError)
    return None


def load_generator(path: str | os.PathLike, **opts: Any) -> Generator:
    """Read a generator checkpoint of any format in `FORMATS`; `opts` go to that format's loader
    (e.g. `use_avg`, `alpha` for PGAN; `psi`, `noise_mode` for StyleGAN; `hparams` for Glow)."""
    path = Path(path)
    obj = read_checkpoint(path)
    name = detect_format(obj)
    if name is None:
        raise CheckpointError(f"{path}: not a generator checkpoint of a known format "
                              f"(found {_summary(obj)}); {_formats_understood()}")
    fmt = FORMATS[name]
    payload = obj
    if name == "glow_y0ast":
        payload = _glow_state(obj)
        if "hparams" not in opts:
            opts["hparams"] = _sibling_hparams(path)
    try:
        generator = fmt.loader(payload, **opts)
    except CheckpointError as error:
        message = str(error)
        raise CheckpointError(message if str(path) in message else f"{path}: {fmt.name}: {message}") from error
    generator.format = name
    return generator


def _summary(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:5]]
        return f"a dict with keys {keys}{'...' if len(obj) > 5 else ''}"
    if isinstance(obj, PickledRecord):
        return f"a pickled {obj.qualname}"
    return f"a {type(obj).__name__}"
