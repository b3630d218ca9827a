"""Foreign checkpoints are read without running anything they name.

Hostile pickles are built here; a marker file proves that none of their payloads ran.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators import checkpoint_sha256, load_generator
from patchscope.generators.io import formats
from patchscope.generators.io.safe_pickle import BaseConfig, PickledRecord, load_pickle, load_torch

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "generators"
GENERATORS_SRC = Path(__file__).resolve().parents[2] / "generators"


class _Payload:
    """Pickles as a call of `func(*args)`, the classic pickle exploit."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_command(marker: Path) -> str:
    return f"{sys.executable} -c \"open({str(marker)!r}, 'w').write('ran')\""


def _write_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _raw_global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol-0 pickle calling `module.name(argument)`, written opcode by opcode."""
    return f"c{module}\n{name}\n(V{argument}\ntR.".encode()


def _hostile_payloads(marker: Path) -> dict[str, bytes]:
    return {
        "os.system": _raw_global_call("os", "system", _touch_command(marker)),
        "posix.system": pickle.dumps(_Payload(os.system, _touch_command(marker))),
        "builtins.exec": pickle.dumps(_Payload(exec, _write_code(marker))),
        "builtins.eval": pickle.dumps(_Payload(eval, _write_code(marker))),
        "subprocess.Popen": pickle.dumps(_Payload(subprocess.Popen, ["touch", str(marker)])),
        "nested in a dict": pickle.dumps({"netG": OrderedDict(w=_Payload(exec, _write_code(marker)))}),
    }


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "payload_ran.txt"
    yield path
    assert not path.exists(), "a pickled payload was executed"


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_payloads_are_live_under_a_plain_unpickler(kind: str, tmp_path: Path) -> None:
    # The control: these pickles do run code when loaded naively, so "no marker" below means something.
    live_marker = tmp_path / "control.txt"
    process = pickle.loads(_hostile_payloads(live_marker)[kind])
    if isinstance(process, subprocess.Popen):
        process.wait(timeout=30)
    assert live_marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "builtins.exec", "builtins.eval",
                                  "subprocess.Popen", "nested in a dict"])
def test_hostile_raw_pickle_comes_out_as_inert_record(kind: str, marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "hostile.pkl"
    path.write_bytes(_hostile_payloads(marker)[kind])
    result = load_pickle(path)
    while isinstance(result, dict):
        result = next(iter(result.values()))
    assert isinstance(result, PickledRecord)
    expected_name = kind.split(".")[-1] if "." in kind else "exec"
    assert result.name == expected_name
    assert "PickledRecord(" in repr(result)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["posix.system", "builtins.exec", "builtins.eval", "subprocess.Popen",
                                  "nested in a dict"])
def test_hostile_torch_zip_is_refused_naming_the_file(kind: str, marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "hostile.pt"
    # torch.save pickles the payload object itself, so rebuild it rather than its bytes.
    objects = {
        "posix.system": _Payload(os.system, _touch_command(marker)),
        "builtins.exec": _Payload(exec, _write_code(marker)),
        "builtins.eval": _Payload(eval, _write_code(marker)),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "nested in a dict": {"netG": OrderedDict(w=_Payload(exec, _write_code(marker)))},
    }
    torch.save(objects[kind], path)
    with pytest.raises(CheckpointError) as caught:
        load_torch(path)
    message = str(caught.value)
    assert str(path) in message and "refused" in message
    assert "\n" not in message


@pytest.fixture
def fake_persistence_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable `torch_utils.persistence` that executes module_src the way NVlabs' does."""

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})  # what the real code does; our loader must never get here
        return meta

    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return module


def _persistent_snapshot(module: types.ModuleType, marker: Path) -> dict:
    weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    meta = {"type": "class", "version": 4, "module_src": _write_code(marker),
            "class_name": "training.networks.Generator",
            "state": {"_parameters": OrderedDict(weight=weight), "_init_kwargs": {"z_dim": 3}}}
    return {"G_ema": _Payload(module._reconstruct_persistent_obj, meta)}


def test_nvlabs_persistent_record_keeps_source_as_inert_text(fake_persistence_module, marker: Path,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps(_persistent_snapshot(fake_persistence_module, marker)))
    record = load_pickle(path)["G_ema"]
    assert isinstance(record, PickledRecord)
    assert record.qualname == "torch_utils.persistence._reconstruct_persistent_obj"
    meta = record.args[0]
    assert meta["module_src"] == _write_code(marker)
    assert meta["class_name"] == "training.networks.Generator"
    assert torch.equal(meta["state"]["_parameters"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert not marker.exists()


def test_nvlabs_persistent_record_in_torch_zip_is_refused(fake_persistence_module, marker: Path,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "snapshot.pt"
    torch.save(_persistent_snapshot(fake_persistence_module, marker), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_torch(path)


def test_hostile_bytes_inside_an_embedded_tensor_are_refused(marker: Path, tmp_path: Path) -> None:
    # NVlabs pickles carry tensors as torch.save bytes; those bytes get the weights_only treatment too.
    buffer = io.BytesIO()
    torch.save(_Payload(exec, _write_code(marker)), buffer, _use_new_zipfile_serialization=False)
    path = tmp_path / "embedded.pkl"
    path.write_bytes(pickle.dumps(_Payload(torch.storage._load_from_bytes, buffer.getvalue())))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_pickle(path)


def test_tensors_numpy_arrays_and_containers_come_back_intact(tmp_path: Path) -> None:
    original = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.arange(5)[1:4],
                "a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5),
                "o": OrderedDict(x={1, 2}, y=frozenset({3}), z=slice(1, 5), c=complex(1, 2))}
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(original, protocol=2))
    loaded = load_pickle(path)
    assert isinstance(loaded["w"], torch.nn.Parameter) and torch.equal(loaded["w"], original["w"])
    assert torch.equal(loaded["b"], torch.tensor([1, 2, 3]))
    np.testing.assert_array_equal(loaded["a"], original["a"])
    assert loaded["s"] == np.float32(2.5) and loaded["o"] == original["o"]


def test_unknown_classes_keep_state_items_and_attr_access(tmp_path: Path) -> None:
    data = (b"\x80\x02csomepkg.things\nEasyDict\n)\x81}(X\x01\x00\x00\x00aK\x01ub"
            b"X\x01\x00\x00\x00kK\x02s.")
    path = tmp_path / "easydict.pkl"
    path.write_bytes(data)
    record = load_pickle(path)
    assert isinstance(record, PickledRecord)
    assert (record.module, record.name) == ("somepkg.things", "EasyDict")
    assert record.attr("a") == 1 and record.attr("missing", "dflt") == "dflt"
    assert record.dict_items == {"k": 2}


def test_pgan_zoo_config_object_becomes_a_plain_attribute_holder() -> None:
    path = FIXTURES / "pgan_zoo" / "pgan_zoo_tiny_s3.pt"
    if not path.exists():
        pytest.skip(f"generator fixtures not found at {FIXTURES}")
    config = load_torch(path)["config"]
    assert isinstance(config, BaseConfig)
    assert config.depthScale0 == 16 and config.depthOtherScales == [16, 8, 8]
    assert config.to_dict()["noiseVectorDim"] == 16


def test_nvlabs_fixture_tensors_match_its_state_dicts() -> None:
    folder = FIXTURES / "sg2ada"
    if not folder.exists():
        pytest.skip(f"generator fixtures not found at {FIXTURES}")
    meta = load_pickle(folder / "sg2ada_tiny32_nosrc.pkl")["G_ema"].args[0]
    reference = load_torch(folder / "sg2ada_tiny32_state_dicts.pt")
    mapping_fc0 = meta["state"]["_modules"]["mapping"].args[0]["state"]["_modules"]["fc0"]
    weight = mapping_fc0.args[0]["state"]["_parameters"]["weight"]
    assert torch.equal(weight, reference["G_ema"]["mapping.fc0.weight"])
    assert meta["state"]["_init_kwargs"] == reference["G_kwargs"]
    assert "never execute" in meta["module_src"]


@pytest.mark.parametrize("content, name", [
    (b"this is a text file, not a checkpoint\n", "notes.txt"),
    (b"", "empty.pt"),
])
def test_wrong_file_gives_one_line_naming_it(content: bytes, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for loader in (load_pickle, load_torch):
        with pytest.raises(CheckpointError) as caught:
            loader(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_pickle_and_zip_are_named(tmp_path: Path) -> None:
    raw = tmp_path / "cut.pkl"
    raw.write_bytes(pickle.dumps({"w": np.zeros(100)})[:-40])
    with pytest.raises(CheckpointError, match=re.escape(str(raw))):
        load_pickle(raw)
    full = tmp_path / "full.pt"
    torch.save({"w": torch.zeros(100)}, full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert zipfile.is_zipfile(full)
    with pytest.raises(CheckpointError, match=re.escape(str(cut))):
        load_torch(cut)


def test_missing_file_is_named(tmp_path: Path) -> None:
    for loader in (load_pickle, load_torch):
        with pytest.raises(CheckpointError, match="no such file"):
            loader(tmp_path / "absent.pkl")


def _call_text(text: str, open_paren: int) -> str:
    """The source of a call from its name to the matching closing parenthesis."""
    depth = 0
    for index in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_paren: index + 1]
    return text[open_paren:]


def test_generators_source_never_unpickles_without_weights_only() -> None:
    unsafe = []
    for source in sorted(GENERATORS_SRC.rglob("*.py")):
        text = source.read_text()
        for match in re.finditer(r"\b(pickle|torch|dill|joblib|_pickle|cPickle)\.(load|loads)\(", text):
            call = match.group(0) + _call_text(text, match.end() - 1)
            if match.group(1) == "torch" and "weights_only=True" in call:
                continue
            unsafe.append(f"{source.name}: {call}")
        if re.search(r"\bUnpickler\(", text) and source.name != "safe_pickle.py":
            unsafe.append(f"{source.name}: Unpickler")
    assert unsafe == []


# ---------------------------------------------------------------------------
# load_generator: the public entry point refuses the same files with one line
# ---------------------------------------------------------------------------

FORMAT_NAMES = ("pgan_zoo", "pgan_tf", "stylegan_tf", "sg2_rosinality", "sg2_nvlabs", "glow_y0ast")


def _assert_one_line_naming(error: CheckpointError, path: Path, *extra: str) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message
    for word in extra:
        assert word in message


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "builtins.exec", "subprocess.Popen",
                                  "nested in a dict"])
def test_load_generator_refuses_hostile_raw_pickles(kind: str, marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "generator.pkl"
    path.write_bytes(_hostile_payloads(marker)[kind])
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    _assert_one_line_naming(caught.value, path, "not a generator checkpoint", *FORMAT_NAMES)


def test_load_generator_refuses_hostile_torch_zip(marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "generator.pt"
    torch.save({"netG": _Payload(os.system, _touch_command(marker)), "netD": {}}, path)
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    _assert_one_line_naming(caught.value, path, "refused", *FORMAT_NAMES)


def test_load_generator_refuses_persistent_records_of_unknown_shape(fake_persistence_module, marker: Path,
                                                                    tmp_path: Path) -> None:
    snapshot = _persistent_snapshot(fake_persistence_module, marker)
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(pickle.dumps({"G_trained": snapshot["G_ema"]}))
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    _assert_one_line_naming(caught.value, path, "G_trained", *FORMAT_NAMES)


def _safetensors_file(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2, 3)}, str(path))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_text("just some notes\n"), "not a readable pickle"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(pickle.dumps({"w": np.zeros(64)})[:-30]), "not a readable pickle"),
    (lambda p: torch.save({"model_state": {"fc.weight": torch.zeros(2)}}, p), "dict with keys ['model_state']"),
    (lambda p: _safetensors_file(p), "safetensors"),
    (lambda p: np.savez(p, a=np.zeros(2)), "not a readable torch checkpoint"),
])
def test_load_generator_names_the_wrong_file_and_the_formats(make, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "wrong.bin"
    make(path)
    if not path.exists():  # np.savez appends .npz
        path = tmp_path / "wrong.bin.npz"
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    _assert_one_line_naming(caught.value, path, expected, "formats understood", *FORMAT_NAMES)


def test_load_generator_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError) as caught:
        load_generator(path)
    _assert_one_line_naming(caught.value, path, "no such checkpoint file")


def test_checkpoint_hash_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"patchscope" * 1000)
    assert checkpoint_sha256(path) == hashlib.sha256(b"patchscope" * 1000).hexdigest()
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "gone.bin"))):
        checkpoint_sha256(tmp_path / "gone.bin")


@pytest.mark.parametrize("target", ["torch._utils\n_rebuild_tensor_v2", "torch.storage\n_load_from_bytes",
                                    "somepkg\nAnything", "numpy\nndarray", "collections\nOrderedDict"])
def test_pickled_state_cannot_modify_allowed_callables_or_stand_in_classes(target: str, tmp_path: Path) -> None:
    # GLOBAL target; BUILD with (None, {"__defaults__": (1,)}): setattr on the global itself
    path = tmp_path / "patch.pkl"
    path.write_bytes(f"c{target}\n(N(dV__defaults__\n(I1\ntstb.".encode())
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_pickle(path)
    # and the allow-listed functions still behave afterwards
    assert torch.equal(load_pickle(io.BytesIO(pickle.dumps(torch.arange(3)))), torch.arange(3))


@pytest.mark.parametrize("relative, expected", [
    ("pgan_zoo/pgan_zoo_tiny_s3.pt", "pgan_zoo"),
    ("pgan_zoo/pgan_zoo_tiny_s3_dictconfig.pt", "pgan_zoo"),
    ("pgan_tf/pgan_tf_tiny32_fused_nosrc.pkl", "pgan_tf"),
    ("sg1_tf/sg1_tf_tiny32_nosrc.pkl", "stylegan_tf"),
    ("sg2_rosinality/sg2_rosinality_tiny32.pt", "sg2_rosinality"),
    ("sg2_rosinality/sg2_rosinality_tiny32_converted_style.pt", "sg2_rosinality"),
    ("sg2ada/sg2ada_tiny32_nosrc.pkl", "sg2_nvlabs"),
    ("glow_y0ast/glow_y0ast_tiny16.pt", "glow_y0ast"),
    ("pgan_zoo/pgan_zoo_tiny_s3_io.pt", None),
    ("sg2ada/sg2ada_tiny32_state_dicts.pt", None),
])
def test_each_fixture_is_detected_as_its_format(relative: str, expected: str | None) -> None:
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"generator fixtures not found at {FIXTURES}")
    assert formats.detect_format(formats.read_checkpoint(path)) == expected
