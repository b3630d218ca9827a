"""Import the authors' released patch-forensics classifiers (`*_net_D.pth`) as patchscope runs.

The public code (chail/patch-forensics) saves a classifier in `models/base_model.py` `save_networks` as
`{'state_dict': net.state_dict(), 'optimizer', 'scheduler', 'epoch', 'best_val_metric', 'best_val_ep'}`, the
DataParallel wrapper taken off first (a bare state dict, or keys under `module.`, are read too). Its patch models
(`models/networks/customnet.py`) are a `CustomXceptionNet` / `CustomResNet` whose top-level modules after the
cut are replaced by `convout`, a 1x1 conv to 2 logits; its full-image baselines (`networks.define_D`) are
torchvision's ResNet (`fc`) and Cadene's Xception (`last_linear`). Its class order is fake = 0, real = 1
(`--fake_class_id`, default 0); patchscope's is real = 0, fake = 1 (`common.labels`).

`TABLES` maps each public top-level module onto patchscope's module of the same model; below it the names agree
(Cadene's `Block`: `rep.{i}`, `skip`, `skipbn`; `SeparableConv2d`: `conv1`, `pointwise`; torchvision's blocks),
so a key `block2.rep.4.pointwise.weight` keeps its tail. Every mapped tensor is checked against the shape
patchscope's model expects, every public tensor must be used and every patchscope parameter and buffer filled.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchscope.common import config as configs
from patchscope.common.checks import check_choice, check_int, check_text
from patchscope.common.errors import CheckpointError, InputError
from patchscope.common.labels import FAKE, REAL
from patchscope.common.runfolder import RunFolder
from patchscope.common.userfiles import read_regular
from patchscope.forensics import checkpoint
from patchscope.forensics.models import MODELS, build_model
from patchscope.forensics.pretrained import without_data_parallel

PUBLIC_FAKE_CLASS = 0          # the public code's default --fake_class_id
MAX_FILE_BYTES = 1 << 30       # its largest model (full Xception, 20.8 M parameters) with Adam state is ~0.3 GB
WHAT = "a patch-forensics checkpoint (*_net_D.pth)"


@dataclass(frozen=True)
class Row:
    """One public top-level module and patchscope's module that takes its tensors."""

    public: str
    ours: str
    linear: bool = False   # an nn.Linear head (N x C) read as patchscope's 1x1 conv (N x C x 1 x 1)
    head: bool = False     # the two-logit output: its class rows are put in patchscope's order


def _same(*names: str) -> tuple[Row, ...]:
    return tuple(Row(name, name) for name in names)


_XCEPTION_STEM = _same("conv1", "bn1", "conv2", "bn2")          # customnet.CustomXceptionNet
_RESNET_STEM = _same("conv1", "bn1")                            # customnet.CustomResNet / torchvision ResNet
_XCEPTION_BLOCKS = tuple(f"block{i}" for i in range(1, 13))
_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_CONVOUT = Row("convout", "convout", head=True)                 # customnet.make_patch_*: the 1x1 conv head

# patchscope model -> (public module -> patchscope module). The public names are the `which_model_netD` values.
TABLES: dict[str, tuple[Row, ...]] = {
    **{f"xception_block{n}": _XCEPTION_STEM + _same(*_XCEPTION_BLOCKS[:n]) + (_CONVOUT,) for n in range(1, 6)},
    **{f"resnet{d}_layer{n}": _RESNET_STEM + _same(*_RESNET_LAYERS[:n]) + (_CONVOUT,)
       for d in (18, 34, 50) for n in (1, 2)},
    # networks.define_D baselines: torchvision's resnet (fc) and xception.xception (fc renamed last_linear)
    **{f"resnet{d}": _RESNET_STEM + _same(*_RESNET_LAYERS) + (Row("fc", "convout", linear=True, head=True),)
       for d in (18, 50)},
    "xception": _XCEPTION_STEM + _same(*_XCEPTION_BLOCKS, "conv3", "bn3", "conv4", "bn4")
    + (Row("last_linear", "convout", linear=True, head=True),),
}
MODEL_CHOICES = ("auto", *TABLES)


@dataclass
class ImportConfig:
    file: str = ""                  # the public *_net_D.pth
    model: str = "auto"             # patchscope model name, or auto: the one model the keys and shapes fit
    out: str = ""                   # run folder to write (best.safetensors, best.json, config.yaml)
    load_size: int | None = 299     # what the classifier is scored at: the paper's 299 / 299
    crop_size: int | None = 299
    fake_class_id: int = PUBLIC_FAKE_CLASS  # the checkpoint's fake class (its opt.yml `fake_class_id`)

    def __post_init__(self) -> None:
        for name in ("file", "out"):
            check_text(self, name)
            if not getattr(self, name):
                raise InputError(f"setting {name}: missing; " + ("give the checkpoint file" if name == "file"
                                                                  else "give the run folder to write (--out)"))
        check_choice(self, "model", MODEL_CHOICES)
        check_int(self, "load_size", 1, checkpoint.MAX_SAVED_SIZE, optional=True)
        check_int(self, "crop_size", 1, checkpoint.MAX_SAVED_SIZE, optional=True)
        check_int(self, "fake_class_id", 0, 1)


KIND = "import-checkpoint"  # config.yaml's `kind`: a folder of anything else is never overwritten
RUN_FOLDER = RunFolder(holds="an imported classifier", kind=KIND, resume_to="import it again",
                       force_to="import it again", writes=("best.safetensors", "best.json"))


# ----------------------------------------------------------------------------- reading

def read_public_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, plain training counters, sha256) of a public checkpoint, read with weights_only=True.

    Anything that is not tensors and plain values (a pickle naming code or classes), a damaged file and
    a file of another kind are one line of CheckpointError naming the file."""
    data = read_regular(path, WHAT, MAX_FILE_BYTES, CheckpointError)
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"{path}: unreadable as {WHAT} (damaged pickle: {_first_line(err)})") from None
        raise CheckpointError(f"{path}: refused: torch.load(weights_only=True) found more than tensors and plain "
                              f"values ({_refused_global(err)}); patchscope runs no code from a checkpoint "
                              "(a damaged file can read the same way)") from None
    except Exception as err:  # a truncated zip or pickle, or no torch file at all
        raise CheckpointError(f"{path}: unreadable as {WHAT}, truncated or not a torch.save file "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    state, counters = _unwrap(path, loaded)
    return state, counters, hashlib.sha256(data).hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0].split(". ")[0][:120] if text else "no message").rstrip(".")


def _refused_global(err: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"\[([\w.]+)\]\)", str(err))
    return f"it names {found.group(1)}" if found else _first_line(err)


def _unwrap(path: str | Path, loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict inside `save_networks`' record (or a bare state dict), `module.` taken off, and the
    record's epoch counters when they are plain numbers."""
    record = loaded if isinstance(loaded, dict) else {}
    state = record.get("state_dict", loaded)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, no state dict; expected {WHAT}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state dict entry {bad!r:.60} is not a named tensor; expected {WHAT}")
    state = without_data_parallel(state)
    counters = {k: record[k] for k in ("epoch", "best_val_metric", "best_val_ep")
                if isinstance(record.get(k), (int, float)) and not isinstance(record[k], bool)
                and math.isfinite(record[k])}
    return state, counters


# ----------------------------------------------------------------------------- mapping

@functools.lru_cache(maxsize=None)
def expected_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of patchscope's `model` and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MODELS[model]().state_dict().items()}


@dataclass
class Fit:
    """How a public state dict fits one patchscope model."""

    model: str
    state: dict[str, torch.Tensor]
    unused: list[str]
    unfilled: list[str]
    shapes: list[str]

    @property
    def ok(self) -> bool:
        return not (self.unused or self.unfilled or self.shapes)

    def problems(self) -> str:
        parts = [f"{len(self.unused)} public tensors unused ({_some(self.unused)})" if self.unused else "",
                 f"{len(self.unfilled)} {self.model} tensors unfilled ({_some(self.unfilled)})" if self.unfilled else "",
                 f"shapes differ: {_some(self.shapes)}" if self.shapes else ""]
        return "; ".join(p for p in parts if p)


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def map_state_dict(public: dict[str, torch.Tensor], model: str, fake_class_id: int = PUBLIC_FAKE_CLASS) -> Fit:
    """The public tensors under patchscope's names for `model`, by `TABLES`, shapes checked; the head's class
    rows reordered from the public order (fake = `fake_class_id`) to patchscope's (real = 0, fake = 1)."""
    rows = {row.public: row for row in TABLES[model]}
    expected = expected_shapes(model)
    state: dict[str, torch.Tensor] = {}
    unused, shapes, misfits = [], [], set()
    for key, tensor in public.items():
        top, _, tail = key.partition(".")
        row = rows.get(top)
        target = f"{row.ours}.{tail}" if row else ""
        if target not in expected:
            unused.append(key)
            continue
        value = tensor.detach()
        if row.linear and value.dim() == 2:
            value = value[:, :, None, None]
        if tuple(value.shape) != expected[target]:
            shapes.append(f"{key} {tuple(tensor.shape)} vs {target} {expected[target]}")
            misfits.add(target)
            continue
        if row.head:
            value = _patchscope_class_order(value, fake_class_id)
        state[target] = value.contiguous()
    unfilled = [k for k in expected if k not in state and k not in misfits]
    return Fit(model, state, unused, unfilled, shapes)


def _patchscope_class_order(value: torch.Tensor, fake_class_id: int) -> torch.Tensor:
    """Rows [real, fake] from a head whose fake class is row `fake_class_id` (the other row is real)."""
    order = [0, 0]
    order[REAL], order[FAKE] = 1 - fake_class_id, fake_class_id
    return value[order].clone()


def fit_model(public: dict[str, torch.Tensor], model: str, fake_class_id: int = PUBLIC_FAKE_CLASS,
              path: str | Path = "checkpoint") -> Fit:
    """The fit of `model` (`auto`: the one model of `TABLES` the keys and shapes fit); one line naming every
    kind of mismatch otherwise."""
    if model != "auto":
        fit = map_state_dict(public, model, fake_class_id)
        if not fit.ok:
            others = [name for name in TABLES if name != model and map_state_dict(public, name, fake_class_id).ok]
            hint = f"; it fits {others[0]} (--model {others[0]} or --model auto)" if others else ""
            raise CheckpointError(f"{path}: does not fit {model}: {fit.problems()}{hint}")
        return fit
    fits = [map_state_dict(public, name, fake_class_id) for name in TABLES]
    good = [fit for fit in fits if fit.ok]
    if len(good) == 1:
        return good[0]
    if good:
        raise CheckpointError(f"{path}: fits several models ({', '.join(f.model for f in good)}); name one "
                              "with --model")
    closest = max(fits, key=lambda f: (len(f.state), -len(f.unused)))
    raise CheckpointError(f"{path}: fits none of the public code's models ({', '.join(TABLES)}); closest "
                          f"{closest.model}: {closest.problems()}")


# ----------------------------------------------------------------------------- the run folder

def train_settings(config: ImportConfig, model: str) -> dict[str, Any]:
    """The `config` a patchscope checkpoint records: the public training settings in patchscope's terms (the
    model, load and crop size; Adam lr 1e-3, batch 32, flips, per-model patience are patchscope's defaults)."""
    from patchscope.forensics.train import TrainConfig

    return configs.to_dict(TrainConfig(model=model, load_size=config.load_size, crop_size=config.crop_size))


def import_checkpoint(config: ImportConfig, force: bool = False) -> dict[str, Any]:
    """Read `config.file`, map it onto patchscope's model and write the run folder `config.out`
    (config.yaml, best.safetensors, best.json with `config` and `imported_from`); returns a summary.

    Everything is read and checked before the folder is touched. The same settings again rewrite the run;
    other settings in a folder of an earlier import need `force`; a folder of anything else is refused."""
    state, counters, digest = read_public_checkpoint(config.file)
    fit = fit_model(state, config.model, config.fake_class_id, config.file)
    broken = next((k for k, v in fit.state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                  None)
    if broken is not None:
        raise CheckpointError(f"{config.file}: {broken} holds NaN or infinite values; expected finite weights")
    model = build_model(fit.model, seed=0)  # every tensor is replaced; the seed keeps the caller's RNG stream
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in fit.state.items()}, strict=True)
    source = {"file": Path(config.file).name, "sha256": digest, "format": "patch-forensics save_networks",
              "public_fake_class_id": config.fake_class_id, "classes_swapped": config.fake_class_id != FAKE,
              **counters}
    meta = {"epoch": counters.get("epoch") if isinstance(counters.get("epoch"), int) else None,
            "config": train_settings(config, fit.model), "imported_from": source}
    settings = {"kind": KIND, **configs.to_dict(config)}
    out = RUN_FOLDER.check(config.out, settings, resume=True, force=force)
    RUN_FOLDER.save(out, settings)
    checkpoint.save_classifier(out / "best", model.eval(), meta)
    return {"out": str(out), "model": fit.model, "tensors": len(fit.state), "imported_from": source,
            "load_size": config.load_size, "crop_size": config.crop_size}
