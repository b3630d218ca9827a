"""Settings files from strangers: alias bombs, cycles, deep nesting, huge files and FIFOs are one line, fast.

The published configs still read exactly as `yaml.safe_load` reads them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from patchscope.common.config import read_yaml, to_yaml
from patchscope.common.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _laughs(levels: int = 9) -> str:
    """The "billion laughs": each level lists the one below nine times (9**9 strings once expanded)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, expected", [
    (_laughs(), "more than 100000 values once its aliases are expanded"),
    ("a: &a [1, *a]\n", "an alias refers to a node that contains it"),
    ("x: &x 1\n" + "".join(f"k{i}: *x\n" for i in range(101)), "more than 100 aliases"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "YAML nested too deeply"),
    (b"a: \xff\xfe\n", "not UTF-8"),
])
def test_hostile_yaml_is_one_line_and_fast(text, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    began = time.monotonic()
    with pytest.raises(InputError) as caught:
        read_yaml(path)
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_a_few_aliases_are_still_settings(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &size 64\nload_size: *size\ncrop_size: *size\nlist: &l [1, 2]\nagain: *l\n")
    assert read_yaml(path) == {"base": 64, "load_size": 64, "crop_size": 64, "list": [1, 2], "again": [1, 2]}


def test_a_settings_file_over_4_mib_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("a: 1\n" + "#" * (4 << 20) + "\n")
    with pytest.raises(InputError, match="more than the 4194304 expected of a YAML settings file"):
        read_yaml(path)


def test_published_configs_read_as_safe_load_reads_them() -> None:
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        assert read_yaml(path) == (yaml.safe_load(path.read_text()) or {}), path


def test_written_settings_read_back(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml({"load_size": 128, "tests": ["a=b,c"], "nested": {"x": None}}))
    assert read_yaml(path) == {"load_size": 128, "tests": ["a=b,c"], "nested": {"x": None}}


def test_missing_and_non_mapping_files_keep_their_messages(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config file not found"):
        read_yaml(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="expected a mapping of settings, got list"):
        read_yaml(tmp_path / "list.yaml")
    with pytest.raises(InputError, match="a directory, not a regular file"):
        read_yaml(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_given_as_config_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    code = ("from patchscope.common.config import read_yaml\n"
            "from patchscope.common.errors import InputError\n"
            "try:\n"
            f"    read_yaml({str(fifo)!r})\n"
            "except InputError as error:\n"
            "    print(error)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("read_yaml waited on a FIFO")
    assert "config.yaml: a FIFO (named pipe), not a regular file; expected a YAML settings file" in done.stdout, \
        done.stdout + done.stderr[-2000:]
