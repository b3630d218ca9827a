"""Build the hostile files into a folder: generator checkpoints that try to run code or exhaust memory, and
classifier run folders (`runs.py`) whose weights or metadata lie. Every file is made here, deterministically.

`make_hostile(root)` writes, under `root`:

* `good/`: what the commands need besides the hostile file: `reals/`, `fakes/` (4 noise images of 32 px each),
  `run/` (a random-weight xception_block1 classifier at 32 px) and `pgan.pt` (a 16 px zoo PGAN with its D);
* `gen/`: one generator checkpoint per case;
* `runs/`, `report/`: classifier run folders (see `runs.py`).

A payload that ran would only create `root/CANARY_<case>` (`canaries(root)` lists them): the test asserts that
none exists. `make_payloads(root)` writes only the payload files (for a control that runs them with naive
loaders); `python tests/data/hostile/make_hostile.py FOLDER` writes everything for a look by hand. Cases built
from the shared generator fixtures (TF PGAN, TF StyleGAN, NVlabs) are left out when those are absent.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.data.hostile.opcodes import (  # noqa: E402
    FALSE, PickledRecord, build, call, forged_object_array, glob, import_os, integer, legacy_storage_bytes,
    mapping, object_dtype, pickle_of, python_touch, raw, repickle, shell_touch, storage_ref, tensor_of, text,
    torch_zip, tup,
)
from tests.data.hostile.runs import make_runs, noise_folder, safetensors_bytes  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "generators"
CANARY = "CANARY_"


def canary(root: Path, case: str) -> Path:
    return Path(root).resolve() / f"{CANARY}{case}"


def canaries(root: Path) -> list[Path]:
    return sorted(Path(root).glob(f"{CANARY}*"))


def make_hostile(root: str | os.PathLike) -> Path:
    root = Path(root)
    for folder in ("good", "gen"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    good = root / "good"
    noise_folder(good / "reals", seed=1)
    noise_folder(good / "fakes", seed=2)
    _good_pgan(good / "pgan.pt")
    make_runs(root, canary)
    make_payloads(root)
    if FIXTURES.is_dir():
        _from_fixtures(root, root / "gen")
    _links(good, root / "gen")
    return root


def make_payloads(root: str | os.PathLike) -> Path:
    """Only the generator files that carry payloads and need no model: `root/gen/*` (pickles, zips, stubs)."""
    root = Path(root)
    gen = root / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    _pickles(root, gen)
    _torch_zips(root, gen)
    _formats(root, gen)
    return root


def _good_pgan(path: Path) -> None:
    from tests.tiny_models import save_tiny_pgan

    save_tiny_pgan(path, seed=0)


# ---------------------------------------------------------------------------------------------- raw pickles

def _system(root: Path, case: str) -> bytes:
    """`os.system("touch CANARY_<case>")`."""
    return call(glob("os", "system"), text(shell_touch(canary(root, case))))


def _pickles(root: Path, gen: Path) -> None:
    def write(case: str, body: bytes) -> None:
        (gen / f"{case}.pkl").write_bytes(pickle_of(body))

    write("pickle_os_system", _system(root, "pickle_os_system"))
    getattr_system = call(glob("builtins", "getattr"), import_os(), text("system"))
    write("pickle_getattr", getattr_system + tup(text(shell_touch(canary(root, "pickle_getattr")))) + b"R")
    partial_eval = call(glob("functools", "partial"), glob("builtins", "eval"),
                        text(python_touch(canary(root, "pickle_partial_eval"))))
    write("pickle_partial_eval", partial_eval + b")R")
    partial_system = call(glob("functools", "partial"), glob("os", "system"),
                          text(shell_touch(canary(root, "pickle_partial_system"))))
    write("pickle_partial_system", mapping((text("netG"), partial_system + b")R"), (text("netD"), mapping())))
    storage = call(glob("torch.storage", "_load_from_bytes"), raw(legacy_storage_bytes(4)))
    write("pickle_rebuild_payload", tensor_of(_system(root, "pickle_rebuild_payload"), 0, (4,), (1,)))
    write("pickle_rebuild_out_of_bounds", tensor_of(storage, 0, (1 << 20, 1 << 20), (1 << 20, 1)))
    write("pickle_rebuild_stride0", tensor_of(storage, 0, (1 << 40,), (0,)))
    write("pickle_numpy_object", forged_object_array("numpy.core.multiarray"))
    write("pickle_numpy2_object", forged_object_array("numpy._core.multiarray"))
    empty = call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), raw(b"b"))
    objects = b"]" + b"(" + _system(root, "pickle_numpy_object_list") + b"e"  # a list of one payload
    write("pickle_numpy_object_list",
          build(empty, tup(integer(1), tup(integer(1)), object_dtype(), FALSE, objects)))
    write("pickle_ordereddict_shadow", _shadowing_ordered_dict(root, "pickle_ordereddict_shadow"))


def _shadowing_ordered_dict(root: Path, case: str, torch_zip_safe: bool = False) -> bytes:
    """OrderedDict(netG={}, netD={}) whose BUILD state shadows its methods: a loader that calls `.get`,
    `.items` or `.keys` on it would call what the file put there instead."""
    items = b"(" + text("netG") + mapping() + text("netD") + mapping() + b"u"  # SETITEMS
    replacement = glob("collections", "OrderedDict")  # an allowed class: callable, yet no method of this dict
    shadows = [(text(name), replacement) for name in ("get", "items", "keys", "values", "__reduce__")]
    if not torch_zip_safe:  # a raw pickle may also try a payload there (refused as a call)
        partial = call(glob("functools", "partial"), glob("os", "system"), text(shell_touch(canary(root, case))))
        shadows.append((text("__reduce_ex__"), partial))
    return build(call(glob("collections", "OrderedDict")) + items, mapping(*shadows))


# ---------------------------------------------------------------------------------------------- torch zips

def _torch_zips(root: Path, gen: Path) -> None:
    def write(case: str, body: bytes, records: dict[str, bytes] | None = None) -> None:
        torch_zip(gen / f"{case}.pt", pickle_of(body), records)

    write("zip_os_system", mapping((text("netG"), _system(root, "zip_os_system")), (text("netD"), mapping())))
    write("zip_getattr", call(call(glob("builtins", "getattr"), import_os(), text("system")),
                              text(shell_touch(canary(root, "zip_getattr")))))
    write("zip_partial_eval", call(glob("functools", "partial"), glob("builtins", "eval"),
                                   text(python_touch(canary(root, "zip_partial_eval")))) + b")R")
    write("zip_ordereddict_shadow", _shadowing_ordered_dict(root, "zip_ordereddict_shadow", torch_zip_safe=True))
    four_floats = {"0": np.zeros(4, dtype="<f4").tobytes()}
    huge_view = tensor_of(storage_ref("0", 4), 0, (1 << 40,), (0,))
    write("zip_zoo_2_40_view", _zoo_like(huge_view), four_floats)
    lying_storage = tensor_of(storage_ref("0", 1 << 40), 0, (1 << 20, 1 << 20), (1 << 20, 1))
    write("zip_zoo_2_40_storage", _zoo_like(lying_storage), four_floats)
    payload = np.array([_Call(os.system, shell_touch(canary(root, "npz_object")))], dtype=object)
    with open(gen / "npz_object.npz", "wb") as handle:
        np.savez(handle, weights=payload)


def _zoo_like(weight: bytes) -> bytes:
    """A pytorch_GAN_zoo checkpoint's shape ({config, netG, netD}) holding `weight` as its first layer."""
    config = mapping((text("depthScale0"), integer(16)), (text("noiseVectorDim"), integer(8)))
    net_g = mapping((text("formatLayer.module.weight"), weight))
    return mapping((text("config"), config), (text("netG"), net_g), (text("netD"), mapping()))


class _Call:
    """Pickles as `func(*args)`: the classic payload, for writers that pickle objects (np.save)."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# ---------------------------------------------------------------------------------------------- TF and NVlabs

def _network(state: dict) -> PickledRecord:
    return PickledRecord("dnnlib.tflib.network", "Network", state=state)


def _persistent(meta: dict) -> PickledRecord:
    return PickledRecord("torch_utils.persistence", "_reconstruct_persistent_obj", args=(meta,))


def _formats(root: Path, gen: Path) -> None:
    # TF PGAN / StyleGAN stubs that name code: build_module_src is what TF's own loader executes
    src = python_touch(canary(root, "tf_pgan_stub"))
    stub = {"version": 4, "name": "G", "static_kwargs": {}, "build_module_src": src, "build_func_name": "G_paper",
            "variables": []}
    (gen / "tf_pgan_stub.pkl").write_bytes(repickle(tuple(_network({**stub, "name": n}) for n in ("G", "D", "Gs"))))
    src = python_touch(canary(root, "tf_stylegan_stub"))
    part = {"version": 4, "static_kwargs": {}, "build_module_src": src, "build_func_name": "os.system",
            "variables": []}
    components = {"mapping": _network({**part, "name": "G_mapping"}),
                  "synthesis": _network({**part, "name": "G_synthesis"})}
    networks = (_network({**part, "name": "G", "components": components}), _network({**part, "name": "D"}),
                _network({**part, "name": "Gs", "components": components}))
    (gen / "tf_stylegan_stub.pkl").write_bytes(repickle(networks))
    # NVlabs: persistent records whose class names and source are an attacker's
    state = {"_parameters": OrderedDict(), "_buffers": OrderedDict(), "_modules": OrderedDict(),
             "_init_kwargs": {"z_dim": 8, "class_name": "os.system"}}
    meta = {"type": "class", "version": 4, "module_src": python_touch(canary(root, "nvlabs_class_path")),
            "class_name": "os.system", "state": state}
    (gen / "nvlabs_class_path.pkl").write_bytes(repickle({"G_ema": _persistent(meta), "D": _persistent(meta)}))
    finder = call(glob("dnnlib.util", "get_obj_by_name"), text("os.system"))
    body = mapping((text("G_ema"), finder + tup(text(shell_touch(canary(root, "nvlabs_get_obj_by_name")))) + b"R"))
    (gen / "nvlabs_get_obj_by_name.pkl").write_bytes(pickle_of(body))
    header = {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}
    (gen / "safetensors_2_40.safetensors").write_bytes(safetensors_bytes(header, b"\0" * 16))


def _from_fixtures(root: Path, gen: Path) -> None:
    """Real networks with the code TF or NVlabs would run put back in: they load, and the code stays text."""
    from patchscope.generators.io.safe_pickle import load_pickle

    def with_source(case: str, key: str):
        def replace(record: PickledRecord) -> PickledRecord:
            if isinstance(record.state, dict) and key in record.state:
                record.state[key] = python_touch(canary(root, case))
            if record.args and isinstance(record.args[0], dict) and key in record.args[0]:
                record.args[0][key] = python_touch(canary(root, case))
            return record
        return replace

    for case, fixture, key in (("tf_pgan_src", "pgan_tf/pgan_tf_tiny32_fused_nosrc.pkl", "build_module_src"),
                               ("tf_stylegan_src", "sg1_tf/sg1_tf_tiny32_nosrc.pkl", "build_module_src"),
                               ("nvlabs_src", "sg2ada/sg2ada_tiny32_nosrc.pkl", "module_src")):
        (gen / f"{case}.pkl").write_bytes(repickle(load_pickle(FIXTURES / fixture), with_source(case, key)))


# ---------------------------------------------------------------------------------------------- links

def _links(good: Path, gen: Path) -> None:
    (gen / "link_regular.pt").symlink_to(good / "pgan.pt")
    (gen / "link_dev_zero.pt").symlink_to("/dev/zero")
    fifo = gen / "fifo.pipe"
    os.mkfifo(fifo)
    (gen / "link_fifo.pt").symlink_to(fifo)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_hostile.py FOLDER")
    print(make_hostile(sys.argv[1]))
