"""The benchmark command writes every figure (with its ratio to the reference step), and gpu_check.sh is valid
bash that names only commands the CLI has."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "run.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_run_writes_every_figure_with_its_reference(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--workloads", "eval,files,loading",
                           "--models", "xception_block1", "--steps", "1", "--warmup", "0", "--sizes", "32",
                           "--batch", "4", "--files", "8", "--crop-on", "device", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    meta = figures["meta"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["cpu_model"] and meta["device_name"]
    assert _positive(meta["matmul_peak_tflops"]["fp32"]) and _positive(meta["matmul_peak_tflops"]["bf16"])
    assert _positive(meta["copy_bandwidth_gbs"]) and "lower bound" in meta["bytes_estimate"]
    rows = {row["workload"]: row for row in figures["results"]}
    assert set(rows) == {"eval", "files", "loading"} and figures["skipped"] == []
    for row in rows.values():
        for key in ("images_per_s", "ms_per_step", "peak_mem_mib", "speedup_vs_reference"):
            assert _positive(row[key]), (row["workload"], key, row[key])
        for key in ("images_per_s", "ms_per_step", "peak_mem_mib"):
            assert _positive(row["reference"][key]), (row["workload"], "reference", key)
        ratio = row["reference"]["ms_per_step"] / row["ms_per_step"]
        assert row["speedup_vs_reference"] == pytest.approx(ratio)
    for key in ("gflop_per_image", "mfu", "gb_per_step", "bandwidth_util"):  # the memory-bound figures
        assert _positive(rows["eval"][key]), key
    assert _positive(rows["loading"]["setup_s"])
    # from files: the share of the model's own rate (one batch kept on the device) the data path delivers
    files = rows["files"]
    assert _positive(files["model_alone_ms_per_step"]) and _positive(files["reference"]["fed"])
    assert files["fed"] == pytest.approx(files["model_alone_ms_per_step"] / files["ms_per_step"])
    assert rows["loading"]["variant"] == "cache+device crop"  # the uint8 batches, cropped by device_crop
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| workload") for line in table)
    assert any(line.startswith("| eval | xception_block1") for line in table)


def _named_commands(script: str) -> set[str]:
    """The subcommand after every `"${PS[@]}"` (the CLI) in the script."""
    return set(re.findall(r'"\$\{PS\[@\]\}"\s+([a-z][a-z-]*)', script))


def test_gpu_check_is_valid_bash_naming_real_commands():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    done = subprocess.run([bash, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = GPU_CHECK.read_text()
    named = _named_commands(script)
    wanted = {"train", "eval", "score", "patches", "sample", "prepare", "exaggerate", "finetune", "retrain",
              "invert", "demo"}
    assert wanted <= named, wanted - named
    listed = CliRunner().invoke(main, ["--help"]).output.split("Commands:", 1)[1]
    in_help = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert named <= in_help, named - in_help
    assert "set -u" in script and "--lpips-random" in script and "--quick" in script


def test_a_failing_workload_is_recorded_and_the_others_keep_their_figures(tmp_path, monkeypatch):
    """On a GPU lent for minutes, one broken workload (or the time limit) must not cost the table: every row is
    saved as it comes (complete: false), a workload that raises is recorded with its error, the rest run, and the
    exit status says something failed."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import run as bench_run

    out = tmp_path / "bench.json"
    seen_before_failing = {}

    def broken(self):
        seen_before_failing.update(json.loads(out.read_text()))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_run.Bench, "loading", broken)
    status = bench_run.main(["--device", "cpu", "--workloads", "eval,loading,train", "--models", "xception_block1",
                             "--steps", "1", "--warmup", "0", "--sizes", "32", "--batch", "4", "--files", "8",
                             "--json", str(out)])
    assert status == 1
    assert seen_before_failing["complete"] is False
    assert [row["workload"] for row in seen_before_failing["results"]] == ["eval"]
    figures = json.loads(out.read_text())
    assert figures["complete"] is True
    assert [row["workload"] for row in figures["results"]] == ["eval", "train"]
    assert figures["failed"] == [{"workload": "loading",
                                  "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]
