"""Hostile checkpoints that aim at memory and time: each is refused in one line, in bounded memory and time.

Loads that could exhaust memory run in a child process under RLIMIT_AS (+1.5 GiB over its imports).
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.io.safe_pickle import load_pickle, load_torch
from tests.generators.test_safety import _Payload

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / ".." / "shared" / "fixtures" / "generators"
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"generator fixtures not found at {FIXTURES}")
PEAK_MB, SECONDS = 300, 10  # a refusal costs far less than either; each attack costs gigabytes or hours

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from patchscope.common.errors import CheckpointError
from patchscope.generators import load_generator
from patchscope.generators.io.safe_pickle import load_pickle

def address_space():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

resource.setrlimit(resource.RLIMIT_AS, (address_space() + (1536 << 20), resource.RLIM_INFINITY))
start, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
try:
    exec(sys.argv[1])
    outcome = "LOADED"
except CheckpointError as error:
    outcome = "REFUSED " + str(error)
except BaseException as error:
    outcome = "CRASHED " + type(error).__name__ + ": " + str(error)[:200]
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024
print(json.dumps({"outcome": outcome, "peak_mb": peak, "seconds": time.monotonic() - began}))
"""


def run_bounded(statement: str, timeout: float = 60) -> dict:
    """Run `statement` in a child under the memory limit; its outcome, peak memory growth and time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, statement], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (a hang): {statement}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_refused_cheaply(result: dict, *words: str) -> None:
    outcome = result["outcome"]
    assert outcome.startswith("REFUSED "), outcome
    assert "\n" not in outcome and all(word in outcome for word in words), outcome
    assert result["peak_mb"] < PEAK_MB and result["seconds"] < SECONDS, result


# ---------------------------------------------------------------------------
# declared sizes against the file
# ---------------------------------------------------------------------------

TWO_GIB = b"\x8a\x05\x00\x00\x00\x80\x00"  # LONG1 2**31


@needs_linux
@pytest.mark.parametrize("pickled, expected", [
    (b"\x80\x02cbuiltins\nbytearray\n" + TWO_GIB + b"\x85R.", "a bytearray would take 2147483648 bytes"),
    (b"\x80\x02cnumpy\nndarray\n" + TWO_GIB + b"\x85\x85R.", "numpy.ndarray may only be named"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + TWO_GIB + b"\x85C\x01b\x87R.",
     "an array would take 2147483648 bytes"),
])
def test_a_40_byte_pickle_asking_for_2_gib_is_refused_before_allocating(pickled: bytes, expected: str,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "alloc.pkl"
    path.write_bytes(pickled)
    assert len(pickled) <= 70
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), expected)


@needs_linux
def test_a_bytearray8_opcode_declaring_gigabytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bytearray8.pkl"
    path.write_bytes(b"\x80\x05\x96" + (1 << 31).to_bytes(8, "little") + b"x.")
    assert_refused_cheaply(run_bounded(f"load_pickle({str(path)!r})"), str(path), "declares")


def _torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes], deflate: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _StoragePickler(pickle.Pickler):
    legacy = False  # the legacy format adds view metadata to each storage's id

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) + ((None,) if self.legacy else ())


def _data_pkl(obj) -> bytes:
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _tensor(storage: _Storage, size: tuple, stride: tuple) -> _Payload:
    return _Payload(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, collections.OrderedDict())


@needs_linux
def test_a_zip_bomb_torch_archive_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    size = 1 << 29
    data = _data_pkl({"w": _tensor(_Storage("0", size // 4), (size // 4,), (1,))})
    path = tmp_path / "bomb.pt"
    # a 512 MiB member of zeros, deflated to about 0.5 MB, written without holding it in memory
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            for _ in range(size // (16 << 20)):
                member.write(bytes(16 << 20))
    assert path.stat().st_size < 1 << 20
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), "zip bomb")


def test_a_storage_declaring_more_than_its_record_is_refused(tmp_path: Path) -> None:
    path = _torch_zip(tmp_path / "lie.pt", _data_pkl({"w": _tensor(_Storage("0", 1 << 28), (4,), (1,))}),
                      {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="declares 1073741824 bytes but its record holds 16"):
        load_torch(path)


@needs_linux
def test_a_zip_pickle_building_a_huge_bytearray_is_refused(tmp_path: Path) -> None:
    path = _torch_zip(tmp_path / "ba.pt", _data_pkl({"w": _Payload(bytearray, 1 << 31)}), {})
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), "a bytearray")


def _legacy_blob(numel: int, data: bytes) -> bytes:
    """A legacy (pre-zip) torch.save stream of one float storage that declares `numel` elements."""
    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    pickler = _StoragePickler(buffer, protocol=2)
    pickler.legacy = True
    pickler.dump(_Storage("0", numel))
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write((len(data) // 4).to_bytes(8, "little") + data)  # element count, then the floats
    return buffer.getvalue()


@needs_linux
def test_embedded_tensor_bytes_declaring_a_huge_storage_are_refused(tmp_path: Path) -> None:
    honest = _legacy_blob(4, bytes(16))
    assert torch.load(io.BytesIO(honest), weights_only=True).nbytes() == 16  # the format is torch's own
    path = tmp_path / "embedded.pkl"
    path.write_bytes(pickle.dumps({"w": _Payload(torch.storage._load_from_bytes, _legacy_blob(1 << 30, bytes(16)))}))
    assert_refused_cheaply(run_bounded(f"load_pickle({str(path)!r})"), str(path), "declare")


def _repeated_calls(count: int, text: str) -> bytes:
    """`[_codecs.encode(text, "latin1")] * count` with `text` stored once: each call copies it again."""
    body = b"\x80\x02c_codecs\nencode\nq\x00X" + len(text).to_bytes(4, "little") + text.encode() + b"q\x01]q\x02("
    call = b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R"
    return body + call * count + b"e."


@needs_linux
def test_a_memoised_string_encoded_thousands_of_times_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "encode.pkl"
    path.write_bytes(_repeated_calls(5000, "x" * (1 << 20)))  # 1 MB of pickle asking for 5 GB
    assert pickle.loads(_repeated_calls(3, "abc")) == [b"abc"] * 3  # the opcodes mean what they say
    assert_refused_cheaply(run_bounded(f"load_pickle({str(path)!r})"), str(path), "more than a file of this size")


class _BigEndianArray:
    """Rebuilds an array from one shared state: numpy copies byte-swapped data at every BUILD."""

    def __init__(self, state: tuple) -> None:
        self.state = state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct  # pickled under numpy.core's name, as numpy does

        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


@needs_linux
def test_arrays_rebuilt_from_one_memoised_state_are_bounded(tmp_path: Path) -> None:
    state = (1, (1 << 18,), np.dtype(">f4"), False, bytes(1 << 20))
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps([_BigEndianArray(state) for _ in range(5000)], protocol=2))
    assert path.stat().st_size < 2 << 20
    assert_refused_cheaply(run_bounded(f"load_pickle({str(path)!r})"), str(path), "an array")


def test_arrays_of_object_dtype_are_refused_before_they_exist(tmp_path: Path) -> None:
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps(np.array([(1, None)], dtype=[("a", "i4"), ("b", "O")]), protocol=2))
    with pytest.raises(CheckpointError, match="object dtype.* refused"):
        load_pickle(path)


# ---------------------------------------------------------------------------
# architectures against the tensors present
# ---------------------------------------------------------------------------

def _zoo_file(path: Path, make) -> Path:
    """A zoo checkpoint whose netG declares depth 6000 at 4x4 (5.4 GB once built), tensors `make(key, shape)`."""
    shapes = {"formatLayer.module.weight": (16 * 6000, 512), "formatLayer.module.bias": (16 * 6000,),
              "groupScale0.0.module.weight": (6000, 6000, 3, 3), "groupScale0.0.module.bias": (6000,),
              "toRGBLayers.0.module.weight": (3, 6000, 1, 1), "toRGBLayers.0.module.bias": (3,)}
    torch.save({"config": {}, "netG": {k: make(k, s) for k, s in shapes.items()}, "netD": {}}, path)
    return path


def _empty_but_shaped(key: str, shape: tuple) -> torch.Tensor:
    # shape[0] is what the loader reads as a depth; a latent width of 1 keeps the file small but real
    if key == "formatLayer.module.weight":
        return torch.zeros(shape[0], 1)
    return torch.zeros(shape[0], 0, *shape[2:])


@needs_linux
def test_a_zoo_file_of_stride_0_tensors_declaring_depth_6000_is_refused(tmp_path: Path) -> None:
    path = _zoo_file(tmp_path / "stride0.pt", lambda key, shape: torch.zeros(1).expand(shape))
    assert path.stat().st_size < 10_000
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), "stride-0")


@needs_linux
def test_a_zoo_file_of_empty_tensors_declaring_depth_6000_is_refused(tmp_path: Path) -> None:
    path = _zoo_file(tmp_path / "empty.pt", _empty_but_shaped)
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), "refused before allocating")


@needs_linux
@needs_fixtures
def test_a_rosinality_file_with_one_huge_width_is_refused(tmp_path: Path) -> None:
    ckpt = load_torch(FIXTURES / "sg2_rosinality" / "sg2_rosinality_tiny32.pt")
    ckpt["g_ema"]["input.input"] = torch.zeros(1, 16000, 4, 0)  # conv1 becomes 16000 x 16000 x 3 x 3
    path = tmp_path / "wide.pt"
    torch.save(ckpt, path)
    assert_refused_cheaply(run_bounded(f"load_generator({str(path)!r})"), str(path), "refused before allocating")


@needs_linux
@needs_fixtures
@pytest.mark.parametrize("resolution", ["2 ** 20", "float('inf')"])
def test_a_tf_stylegan_declaring_a_huge_resolution_is_refused(resolution: str) -> None:
    fixture = FIXTURES / "sg1_tf" / "sg1_tf_tiny32_nosrc.pkl"
    statement = ("from patchscope.generators.stylegan.tf import load_stylegan_tf\n"
                 f"nets = load_pickle({str(fixture)!r})\n"
                 "for net in (nets[2], nets[2].state['components']['synthesis']):\n"
                 f"    net.state['static_kwargs']['resolution'] = {resolution}\n"
                 "load_stylegan_tf(nets, source='sg1.pkl')\n")
    assert_refused_cheaply(run_bounded(statement), "sg1.pkl", "resolution")


@needs_fixtures
def test_a_tf_pgan_with_an_infinite_resolution_is_one_line() -> None:
    from patchscope.generators.pgan.tf import load_pgan_tf

    nets = load_pickle(FIXTURES / "pgan_tf" / "pgan_tf_tiny32_fused_nosrc.pkl")
    nets[2].state["static_kwargs"]["resolution"] = float("inf")
    with pytest.raises(CheckpointError, match="resolution is inf; expected an integer"):
        load_pgan_tf(nets)
