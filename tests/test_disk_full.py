"""A disk that fills while `train` saves an epoch (issue 21 item 3), through the real `patchscope` script.

Two ways to make a write fail for real, not by patching Python: a small tmpfs filled up to a few KB
(ENOSPC; mounting takes root, skipped elsewhere), and a file-size limit (`RLIMIT_FSIZE`, EFBIG; runs
anywhere, Python ignores SIGXFSZ). Each time: one line on stderr, exit code 1, the previous epoch's
commit untouched and every file still parsing; after space is freed the same command resumes and ends
with the bytes of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from tests.faults import CLI, ENV, check_files, run_clean, safetensors_equal


def _train_args(data: Path, config: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "--config", str(config), "--real", str(data / "real"), "--fake", str(data / "fake"),
            "--out", str(out), "--load-size", "32", "--crop-size", "32", "--batch-size", "16",
            "--max-epochs", str(epochs), "--device", "cpu", "--precision", "fp32", "--seed", "0"]


@pytest.fixture
def train_config(tmp_path: Path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: xception_block1\n  init: kaiming\n  patience: 10\n")
    return config


def _committed(out: Path) -> tuple[int, dict[str, bytes]]:
    """The epoch checkpoint.json names and the bytes of the files it lists."""
    manifest = json.loads((out / "checkpoint.json").read_text())
    return manifest["epoch"], {name: (out / name).read_bytes() for name in sorted(manifest["files"])}


def _assert_failed_cleanly(done: subprocess.CompletedProcess, out: Path, before: tuple[int, dict[str, bytes]],
                           reason: str) -> None:
    assert done.returncode == 1, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: ") and reason in lines[-1], done.stderr
    assert _committed(out) == before, "the last committed epoch changed"
    check_files(out)  # .staged/ included: whatever the failed save left there parses


def _finish_and_compare(data: Path, config: Path, out: Path, clean: Path) -> None:
    done = subprocess.run(CLI + _train_args(data, config, out, 3) + ["--resume"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_files(out)
    assert _committed(out)[0] == 3
    for name in ("last.safetensors", "best.safetensors"):
        assert safetensors_equal(clean / name, out / name), f"{name} differs from the uninterrupted run"
    assert _untimed_log(clean) == _untimed_log(out)


def _untimed_log(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "images_per_s")} for line in lines]


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_file_size_limit_mid_save_keeps_the_last_epoch(tmp_path, builtin_dataset, train_config):
    clean, out = tmp_path / "clean", tmp_path / "run"
    run_clean(_train_args(builtin_dataset, train_config, clean, 3))
    run_clean(_train_args(builtin_dataset, train_config, out, 1))
    before = _committed(out)
    largest = max(len(contents) for contents in before[1].values())
    assert largest > 64 * 1024  # the limit below falls inside that file's write, not before it
    done = subprocess.run(CLI + _train_args(builtin_dataset, train_config, out, 3) + ["--resume"], env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(largest // 2))
    _assert_failed_cleanly(done, out, before, "file too large")
    _finish_and_compare(builtin_dataset, train_config, out, clean)


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs takes root; the RLIMIT_FSIZE test covers a failing write without it")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the RLIMIT_FSIZE test "
                    f"covers a failing write")


def test_full_disk_mid_save_keeps_the_last_epoch(tmp_path, builtin_dataset, train_config):
    clean, disk = tmp_path / "clean", tmp_path / "disk"
    run_clean(_train_args(builtin_dataset, train_config, clean, 3))
    _mount_tmpfs(disk, "16m")
    try:
        out = disk / "run"
        run_clean(_train_args(builtin_dataset, train_config, out, 1))
        before = _committed(out)
        stats = os.statvfs(disk)
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave 16 KB: less than any checkpoint, more than a metrics line
            f.write(b"\0" * (stats.f_bavail * stats.f_frsize - 16 * 1024))
        done = subprocess.run(CLI + _train_args(builtin_dataset, train_config, out, 3) + ["--resume"], env=ENV,
                              capture_output=True, text=True, timeout=300)
        _assert_failed_cleanly(done, out, before, "no space left on device")
        filler.unlink()
        _finish_and_compare(builtin_dataset, train_config, out, clean)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
