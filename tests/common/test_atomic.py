"""Crash-safe writes (common/atomic.py): the umask's file mode, created folders, the old content kept
and no temporary file left when a write fails, and every file a real command writes is 0644 under
umask 022."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common.atomic import (append_line, atomic_open, current_umask, is_temporary_name,
                                      replace_atomically, write_bytes, write_json, write_text)
from tests.tiny_models import save_tiny_pgan


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after (umask is per process, so xdist
    workers do not see each other's)."""
    before = os.umask(0o022)

    def set_mask(mask: int) -> int:
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


WRITERS = {
    "write_text": lambda p: write_text(p, "text\n"),
    "write_json": lambda p: write_json(p, {"a": 1}),
    "write_bytes": lambda p: write_bytes(p, b"\x00\x01"),
    "replace_atomically": lambda p: replace_atomically(p, lambda f: f.write(b"bytes")),
}


def _write_with_atomic_open(path: Path) -> None:
    with atomic_open(path, "w") as handle:
        handle.write("x")


WRITERS["atomic_open"] = _write_with_atomic_open


@pytest.mark.parametrize("mask, mode", [pytest.param(0o022, 0o644, id="umask022"),
                                        pytest.param(0o077, 0o600, id="umask077"),
                                        pytest.param(0o027, 0o640, id="umask027")])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_written_file_gets_the_mode_the_umask_asks_for(umask, tmp_path, writer, mask, mode):
    # mkstemp alone would give 0600 whatever the umask: a result others on the machine cannot read.
    umask(mask)
    target = tmp_path / "out.dat"
    WRITERS[writer](target)
    assert _mode(target) == mode
    assert current_umask() == mask  # reading the umask leaves it as it was


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_creates_the_missing_folders_and_leaves_only_the_file(tmp_path, writer):
    target = tmp_path / "a" / "b" / "out.dat"
    WRITERS[writer](target)
    assert target.is_file()
    assert [p.name for p in target.parent.iterdir()] == ["out.dat"]


def test_the_writers_write_what_they_are_given(tmp_path):
    write_text(tmp_path / "t", "héllo\n")
    write_bytes(tmp_path / "b", bytes(range(256)))
    write_json(tmp_path / "j", {"x": [1, 2.5, None], "nan": float("nan")})
    replace_atomically(tmp_path / "r", lambda f: f.write(b"abc"))
    assert (tmp_path / "t").read_text() == "héllo\n"
    assert (tmp_path / "b").read_bytes() == bytes(range(256))
    loaded = json.loads((tmp_path / "j").read_text())
    assert loaded["x"] == [1, 2.5, None] and loaded["nan"] != loaded["nan"]
    assert (tmp_path / "r").read_bytes() == b"abc"


class Interrupted(Exception):
    pass


def _fail_in_atomic_open(path: Path) -> None:
    with atomic_open(path, "w") as handle:
        handle.write("half of the new")
        handle.flush()
        raise Interrupted


def _fail_in_replace_atomically(path: Path) -> None:
    def write(handle: io.BufferedWriter) -> None:
        handle.write(b"half of the new")
        raise Interrupted

    replace_atomically(path, write)


def _fail_in_write_json(path: Path) -> None:
    write_json(path, {"not serialisable": object()})  # fails in json.dumps, before anything is opened


@pytest.mark.parametrize("fail", [_fail_in_atomic_open, _fail_in_replace_atomically, _fail_in_write_json])
def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, fail):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises((Interrupted, TypeError)):
        fail(target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Interrupted):
        _fail_in_atomic_open(tmp_path / "new.txt")
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_hidden_beside_the_target_and_recognised(tmp_path):
    target = tmp_path / "report.html"
    with atomic_open(target, "w") as handle:
        handle.write("x")
        (temporary,) = tmp_path.iterdir()
        assert not target.exists()  # nothing under the final name before the rename
    assert temporary.name.startswith(".report.html.") and is_temporary_name(temporary.name)
    assert not temporary.exists() and target.read_text() == "x"


@pytest.mark.parametrize("name", ["report.html", "x.tmp", ".hidden", ".config.yaml", "run.tmp.json"])
def test_ordinary_names_are_not_taken_for_temporary_files(name):
    assert not is_temporary_name(name)


def test_append_line_creates_the_folder_adds_one_line_each_and_follows_the_umask(umask, tmp_path):
    umask(0o022)
    log = tmp_path / "run" / "metrics.jsonl"
    append_line(log, '{"epoch": 1}')
    append_line(log, '{"epoch": 2}\n')
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert _mode(log) == 0o644


def _wrong_modes(folder: Path, file_mode: int, dir_mode: int) -> list[str]:
    wrong = [f"{p.relative_to(folder)}: {oct(_mode(p))}" for p in sorted(folder.rglob("*"))
             if _mode(p) != (dir_mode if p.is_dir() else file_mode)]
    return wrong + [f"{p.relative_to(folder)}: temporary file left" for p in folder.rglob("*")
                    if is_temporary_name(p.name)]


def test_every_file_a_real_command_writes_is_0644_under_umask_022(umask, tmp_path, builtin_dataset):
    """sample, then train and eval with heatmaps: images, manifests, checkpoints, logs, pages. A writer
    that bypasses common.atomic with mkstemp or mkdtemp shows up here as 0600 or 0700."""
    generator = save_tiny_pgan(tmp_path / "pgan.pt", seed=0)  # written before the umask is set
    umask(0o022)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["sample", str(generator), "--out", str(out / "sampled"), "--train", "3",
                                  "--test", "2", "--batch-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  model: xception_block1\n  init: kaiming\n")
    result = runner.invoke(main, ["train", "--config", str(config), "--real", str(builtin_dataset / "real"),
                                  "--fake", str(builtin_dataset / "fake"), "--out", str(out / "run"),
                                  "--load-size", "32", "--crop-size", "32", "--batch-size", "32",
                                  "--max-epochs", "1", "--device", "cpu", "--precision", "fp32"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["eval", str(out / "run"), "--test",
                                  f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}", "--heatmaps", "1",
                                  "--device", "cpu", "--precision", "fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for name in ("sampled/manifest.json", "sampled/train/000000.png", "run/config.yaml", "run/metrics.jsonl",
                 "run/last.safetensors", "run/resume.pt", "run/eval/heatmaps/b/heatmaps.html"):
        assert name in written, sorted(written)
    wrong = _wrong_modes(out, 0o644, 0o755)
    assert not wrong, "not 0644 (files) / 0755 (folders) under umask 022:\n" + "\n".join(wrong)
