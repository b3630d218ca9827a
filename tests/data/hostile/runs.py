"""Hostile classifier run folders: weights (.safetensors) whose header lies, metadata (best.json) with an
attacker's values, links to devices and FIFOs; and run folders for `patchscope report` whose result files
carry markup, `../` names, huge numbers, deep nesting, FIFOs and sparse multi-GiB files.

Used by `make_hostile.py`: `make_runs(root, canary)` writes `root/good/run`, `root/runs/<case>/` and
`root/report/<case>/`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tests.data.hostile.opcodes import call, glob, mapping, pickle_of, shell_touch, text, torch_zip

SIZE = 32
SCRIPT = "<script>alert('patchscope')</script>"
ESCAPE = "patchscope_escape"  # the last part of every `../` name: the test looks for it above each folder
MARKUP_NAME = "<img src=x onerror=alert(1)>"  # markup that fits in a file name (no slash)
SPARSE_BYTES = 5 << 30  # a file this large takes no disk when sparse; reading it whole would take 5 GiB


def noise_folder(folder: Path, seed: int, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def safetensors_bytes(header: dict, data: bytes, declared_length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (or `declared_length`), JSON header, data."""
    encoded = json.dumps(header).encode()
    length = len(encoded) if declared_length is None else declared_length
    return length.to_bytes(8, "little") + encoded + data


def _sparse(path: Path, size: int = SPARSE_BYTES) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def make_runs(root: Path, canary: Callable[[Path, str], Path]) -> None:
    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.forensics.models import build_model

    good = root / "good" / "run"
    save_classifier(good / "best", build_model("xception_block1", seed=0),
                    {"epoch": 1, "config": {"load_size": SIZE, "crop_size": SIZE}})
    meta = json.loads((good / "best.json").read_text())
    runs = root / "runs"

    def run(case: str, weights: bytes | None = None, **changes) -> Path:
        folder = runs / case
        folder.mkdir(parents=True)
        (folder / "best.safetensors").write_bytes((good / "best.safetensors").read_bytes() if weights is None
                                                  else weights)
        (folder / "best.json").write_text(json.dumps({**meta, **changes}))
        return folder

    # ---- weights whose header lies
    weight = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    run("st_offsets_past_end", safetensors_bytes({"w": {**weight, "data_offsets": [0, 1 << 20]}}, b"\0" * 16))
    run("st_header_past_end", safetensors_bytes({"w": weight}, b"\0" * 16, declared_length=1 << 20))
    run("st_dtype_shape_mismatch", safetensors_bytes({"w": {**weight, "shape": [2, 3]}}, b"\0" * 16))
    run("st_huge_header_length", safetensors_bytes({"w": weight}, b"\0" * 16, declared_length=(1 << 63) - 1))
    run("st_2_40_tensor", safetensors_bytes({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                                                   "data_offsets": [0, 4 << 40]}}, b"\0" * 16))
    folder = run("st_sparse", b"")
    _sparse(folder / "best.safetensors", 7 << 29)  # 3.5 GiB: under the 4 GiB cap on any weights file
    folder = run("pickle_as_safetensors", b"")
    payload = call(glob("os", "system"), text(shell_touch(canary(root, "pickle_as_safetensors"))))
    torch_zip(folder / "best.safetensors", pickle_of(mapping((text("w"), payload))))

    # ---- links
    folder = run("run_link_dev_zero")
    (folder / "best.safetensors").unlink()
    (folder / "best.safetensors").symlink_to("/dev/zero")
    folder = run("run_link_fifo")
    (folder / "best.json").unlink()
    os.mkfifo(folder / "pipe")
    (folder / "best.json").symlink_to(folder / "pipe")
    folder = runs / "run_link_regular"
    folder.mkdir()
    for name in ("best.safetensors", "best.json"):
        (folder / name).symlink_to(good / name)

    # ---- metadata with an attacker's values
    run("json_script_model", model=SCRIPT, epoch=SCRIPT, val={"ap": SCRIPT, SCRIPT: 1})
    run("json_dotdot_model", model=f"../../../../tmp/{ESCAPE}",
        config={"load_size": SIZE, "crop_size": SIZE, "out": f"../../{ESCAPE}", "name": f"../../{ESCAPE}"})
    run("json_huge_numbers", epoch=10 ** 400, config={"load_size": 10 ** 30, "crop_size": 1e308})
    run("json_wrong_types", model={"name": "xception_block1"}, config="load_size=32", format_version=[1])
    folder = run("json_deep")
    (folder / "best.json").write_text("[" * 100_000 + "]" * 100_000)
    folder = run("json_sparse")
    _sparse(folder / "best.json")
    _report_folders(root / "report", good)


def _report_folders(report: Path, good: Path) -> None:
    """Run folders as `patchscope report` reads them: its result files, written by an attacker."""
    hostile = report / "hostile_values"
    files = {
        "best.json": {"kind": "patchscope-classifier", "model": SCRIPT, "epoch": 10 ** 400,
                      "val": {"ap": SCRIPT, "acc": [1, {SCRIPT: SCRIPT}], "n": 1e308, SCRIPT: 1},
                      "config": {"out": f"../../../{ESCAPE}", "real": SCRIPT}},
        "eval/metrics.json": {"model": SCRIPT, "run": f"../../../{ESCAPE}", "aggregation": SCRIPT, "split": SCRIPT,
                              "results": {SCRIPT: {"after_softmax": {"ap": 1e308, "acc": 10 ** 400}},
                                          f"../../../{ESCAPE}": {SCRIPT: {"n_real": -1}}}},
        "patches/patches.json": {"model": SCRIPT, "patches": [{"image": "../../../../etc/passwd", "class": SCRIPT}]},
        "heatmaps/heatmaps.json": {"model": SCRIPT, "groups": {"real_easiest": [{"card": "../../../../etc/passwd",
                                                                                 "source": SCRIPT}]}},
    }
    for name, value in files.items():
        (hostile / name).parent.mkdir(parents=True, exist_ok=True)
        (hostile / name).write_text(json.dumps(value))
    log = [{"epoch": 1, "train_loss": 10 ** 400, "val_ap": 1e308, SCRIPT: 1},
           {"epoch": 2, "train_loss": -1e308, "val_ap": float("nan"), "best_epoch": 10 ** 400},
           {"epoch": SCRIPT, "train_loss": f"../../{ESCAPE}"}]
    (hostile / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    (hostile / "config.yaml").write_text(f"model: {SCRIPT}\nout: ../../../{ESCAPE}\n")
    (hostile / "patches" / f"sheet_{MARKUP_NAME}.png").write_bytes((good.parent / "reals" / "00.png").read_bytes())

    deep = report / "deep"
    deep.mkdir(parents=True)
    (deep / "best.json").write_text("[" * 100_000 + "]" * 100_000)
    (deep / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n" + json.dumps({"epoch": 1}) + "\n")
    (deep / "eval").mkdir()
    (deep / "eval" / "metrics.json").write_text('{"results": {"t": 1' + "0" * 5000 + "}}")  # past int's 4300 digits

    fifos = report / "fifos"
    (fifos / "eval").mkdir(parents=True)
    for name in ("best.json", "metrics.jsonl", "config.yaml", "eval/metrics.json", "eval/pr_curve.png"):
        os.mkfifo(fifos / name)

    sparse = report / "sparse"
    (sparse / "eval").mkdir(parents=True)
    shutil.copy(good / "best.json", sparse / "best.json")
    for name in ("metrics.jsonl", "config.yaml", "eval/metrics.json", "eval/pr_curve.png"):
        _sparse(sparse / name)
