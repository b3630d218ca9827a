"""Hostile generator inputs that used to hang or end in a traceback, and the wording of refusals.

Shared-object graphs (kwargs, modules, zoo configs), FIFOs and malformed Glow hparams: each is one line.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import statistics
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators import load_generator
from patchscope.generators.io.safe_pickle import BaseConfig, load_pickle, load_torch
from patchscope.generators.stylegan2.nvlabs import load_nvlabs
from tests.generators.test_hostile_bounds import FIXTURES, needs_fixtures, needs_linux, run_bounded
from tests.generators.test_safety import _Payload, fake_persistence_module  # noqa: F401 (a fixture)


def _snapshot(module: types.ModuleType, state: dict) -> dict:
    meta = {"type": "class", "version": 4, "module_src": "", "class_name": "training.networks.Generator",
            "state": {"_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(), **state}}
    return {"G_ema": _Payload(module._reconstruct_persistent_obj, meta)}


def _shared_lists(levels: int) -> list:
    """A DAG of lists, each holding the one below twice: 2**levels elements once expanded."""
    node: list = [1, 1]
    for _ in range(levels):
        node = [node, node]
    return node


@needs_linux
def test_kwargs_of_shared_lists_expanding_to_2_40_are_refused_quickly(fake_persistence_module,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "dag.pkl"
    path.write_bytes(pickle.dumps(_snapshot(fake_persistence_module, {"_init_kwargs": {"z": _shared_lists(40)}})))
    assert path.stat().st_size < 2000
    result = run_bounded(f"load_generator({str(path)!r})", timeout=30)
    assert result["outcome"].startswith("REFUSED ") and "more than 10000 values" in result["outcome"], result
    assert result["seconds"] < 5


def _module_state(children: dict) -> dict:
    return {"_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(children)}


def _cyclic_kwargs() -> dict:
    loop: list = []
    loop.append(loop)
    return {"_init_kwargs": {"z": loop}}


def _cyclic_modules() -> dict:
    state = _module_state({})
    state["_modules"]["again"] = state
    return state


def _shared_modules() -> dict:
    state = _module_state({})
    for _ in range(20):  # 2**20 visits once expanded: seconds before, refused at once now
        state = _module_state({"a": state, "b": state})
    return state


@pytest.mark.parametrize("make, expected", [
    (_cyclic_kwargs, "contain themselves"),
    (_cyclic_modules, "contain themselves"),
    (_shared_modules, "repeat too often"),
])
def test_self_referring_or_shared_records_are_one_line(make, expected: str, fake_persistence_module,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "graph.pkl"
    path.write_bytes(pickle.dumps(_snapshot(fake_persistence_module, make())))
    with pytest.raises(CheckpointError, match=expected) as caught:
        load_nvlabs(load_pickle(path), source=str(path))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.fixture
def zoo_config_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets torch.save pickle our BaseConfig under the zoo's name, as the zoo's own files do."""
    for name in ("models", "models.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("models.utils.config")
    module.BaseConfig = BaseConfig
    monkeypatch.setitem(sys.modules, "models.utils.config", module)


@needs_fixtures
def test_a_zoo_config_that_contains_itself_is_one_line(zoo_config_importable, tmp_path: Path) -> None:
    ckpt = load_torch(FIXTURES / "pgan_zoo" / "pgan_zoo_tiny_s3.pt")
    ckpt["config"].loop = ckpt["config"]
    path = tmp_path / "loop.pt"
    torch.save(ckpt, path)
    assert "BaseConfig(" in repr(load_torch(path)["config"])  # its repr no longer recurses either
    with pytest.raises(CheckpointError, match="the config contains itself") as caught:
        load_generator(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@needs_fixtures
def test_zoo_config_state_cannot_shadow_its_methods(zoo_config_importable, tmp_path: Path) -> None:
    ckpt = load_torch(FIXTURES / "pgan_zoo" / "pgan_zoo_tiny_s3.pt")
    vars(ckpt["config"])["to_dict"] = "not a method"
    path = tmp_path / "shadow.pt"
    torch.save(ckpt, path)
    assert load_generator(path).resolution == load_generator(FIXTURES / "pgan_zoo" / "pgan_zoo_tiny_s3.pt").resolution


# ---------------------------------------------------------------------------
# Glow hparams: regular files, bounded JSON, checked values
# ---------------------------------------------------------------------------

@pytest.fixture
def glow_copy(tmp_path: Path) -> Path:
    source = FIXTURES / "glow_y0ast" / "glow_y0ast_tiny16.pt"
    if not source.exists():
        pytest.skip(f"generator fixtures not found at {FIXTURES}")
    return Path(shutil.copy(source, tmp_path / "glow.pt"))


def _hparams(**changes) -> str:
    hparams = json.loads((FIXTURES / "glow_y0ast" / "glow_y0ast_tiny16_hparams.json").read_text())
    return json.dumps({**hparams, **changes})


@pytest.mark.parametrize("text, expected", [
    (lambda: _hparams(n_bits=float("inf")), "n_bits is inf; expected an integer from 1 to 16"),
    (lambda: _hparams(n_bits=[5]), "n_bits is [5]; expected an integer"),
    (lambda: "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    (lambda: "[" * 100 + "]" * 100, "JSON nested deeper than 64 levels"),
    (lambda: "[1, 2]", "hparams are a list; expected a JSON object"),
])
def test_malformed_glow_hparams_are_one_line(text, expected: str, glow_copy: Path) -> None:
    (glow_copy.parent / "glow_hparams.json").write_text(text())
    with pytest.raises(CheckpointError) as caught:
        load_generator(glow_copy)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@needs_linux
def test_a_fifo_named_as_glow_hparams_is_refused_not_waited_on(glow_copy: Path) -> None:
    fifo = glow_copy.parent / "glow_hparams.json"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="a FIFO .named pipe., not a regular file"):
        load_generator(glow_copy)
    statement = ("from patchscope.generators.glow.y0ast import load_glow_y0ast_file\n"
                 f"load_glow_y0ast_file({str(glow_copy)!r}, hparams_path={str(fifo)!r})\n")
    assert "not a regular file" in run_bounded(statement, timeout=30)["outcome"]


@needs_linux
def test_a_fifo_named_as_a_checkpoint_is_named_as_one(tmp_path: Path) -> None:
    fifo = tmp_path / "generator.pt"
    os.mkfifo(fifo)
    # in a child: opening a FIFO for reading waits for a writer, forever
    statement = ("from patchscope.generators.io.safe_pickle import load_torch\n"
                 "for load in (load_generator, load_pickle, load_torch):\n"
                 "    try:\n"
                 f"        load({str(fifo)!r})\n"
                 "    except CheckpointError as error:\n"
                 "        assert 'a FIFO (named pipe), not a regular file' in str(error), str(error)\n"
                 "    else:\n"
                 "        raise AssertionError('loaded')\n")
    assert run_bounded(statement, timeout=30)["outcome"] == "LOADED"  # every assertion inside held


# ---------------------------------------------------------------------------
# refusals say what was found, never torch's advice, in a short line
# ---------------------------------------------------------------------------

TORCH_ADVICE = ("weights_only", "trust", "safe_globals", "allowlist", "add_safe_globals")


def _hostile_files(tmp_path: Path) -> list[Path]:
    files = []
    for name, obj in (("exec.pt", {"netG": _Payload(exec, "print(1)"), "netD": {}}),
                      ("system.pt", _Payload(os.system, "true"))):
        torch.save(obj, tmp_path / name)
        files.append(tmp_path / name)
    embedded = tmp_path / "embedded.pkl"
    buffer = io.BytesIO()
    torch.save(_Payload(exec, "print(1)"), buffer, _use_new_zipfile_serialization=False)
    embedded.write_bytes(pickle.dumps({"G_ema": _Payload(torch.storage._load_from_bytes, buffer.getvalue())}))
    return [*files, embedded]


def test_refused_torch_files_name_what_was_found_without_torchs_advice(tmp_path: Path) -> None:
    messages = []
    for path in _hostile_files(tmp_path):
        for load in (load_torch if path.suffix == ".pt" else load_pickle, load_generator):
            with pytest.raises(CheckpointError) as caught:
                load(path)
            messages.append(str(caught.value))
    for message in messages:
        assert not any(word in message.lower() for word in TORCH_ADVICE), message
        assert "\n" not in message and "\x1b" not in message
        assert "exec" in message or "system" in message, message
    # the file, what was found, what was expected: short enough to read at a glance
    assert statistics.median(len(m) for m in messages) < 200 + len(str(tmp_path))
