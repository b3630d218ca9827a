"""A classifier checkpoint's metadata and weights from a stranger: every bad value is one line, nothing hangs.

FIFOs are opened in a child process with a time limit, since reading one would wait forever.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import FORMAT_VERSION, load_classifier, save_classifier
from patchscope.forensics.models import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    save_classifier(run / "best", build_model("xception_block1", seed=0),
                    {"epoch": 1, "config": {"load_size": 32, "crop_size": 32}})
    return run


@pytest.fixture
def run_copy(saved_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.safetensors", "best.json"):
        (run / name).write_bytes((saved_run / name).read_bytes())
    return run


def _edit_meta(run: Path, **changes) -> None:
    meta = json.loads((run / "best.json").read_text())
    (run / "best.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("changes, expected", [
    ({"model": ["xception_block1"]}, "'model' is ['xception_block1']; expected a model name"),
    ({"model": None}, "'model' is None; expected a model name"),
    ({"config": [32, 32]}, "'config' is a list; expected the mapping of training settings"),
    ({"config": "load_size=32"}, "'config' is a str; expected the mapping"),
    ({"config": {"load_size": -3}}, "config load_size=-3; expected an integer from 1 to 8192 or null"),
    ({"config": {"crop_size": "big"}}, "config crop_size='big'; expected an integer"),
    ({"config": {"load_size": 100_000}}, "config load_size=100000; expected an integer from 1 to 8192"),
    ({"config": {"crop_size": 32.5}}, "config crop_size=32.5; expected an integer"),
    ({"config": {"load_size": True}}, "config load_size=True; expected an integer"),
    ({"format_version": 99}, f"format_version 99; this patchscope reads classifier checkpoints of version 1 "
                             f"to {FORMAT_VERSION} (a newer patchscope wrote it?)"),
    ({"format_version": "1"}, "format_version '1'"),
    ({"format_version": 0}, "format_version 0"),
])
def test_hostile_metadata_values_are_one_line(run_copy: Path, changes: dict, expected: str) -> None:
    _edit_meta(run_copy, **changes)
    with pytest.raises(InputError) as caught:
        load_classifier(run_copy)
    message = str(caught.value)
    assert expected in message and str(run_copy / "best.json") in message and "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"kind": "patchscope-classifier", "x": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 64 levels"),
    ('{"kind": "patchscope-classifier", "model": "xception_block1"', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
])
def test_malformed_metadata_json_is_one_line(run_copy: Path, text: str, expected: str) -> None:
    (run_copy / "best.json").write_bytes(text.encode("latin1"))
    with pytest.raises(InputError) as caught:
        load_classifier(run_copy)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_metadata_without_format_version_still_loads(run_copy: Path) -> None:
    meta = json.loads((run_copy / "best.json").read_text())
    del meta["format_version"]
    (run_copy / "best.json").write_text(json.dumps(meta))
    assert load_classifier(run_copy)[1]["epoch"] == 1


def _poison(run: Path, value: float) -> str:
    weights = load_file(str(run / "best.safetensors"))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = value
    save_file(weights, str(run / "best.safetensors"))
    return key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused_when_loaded(run_copy: Path, value: float) -> None:
    key = _poison(run_copy, value)
    with pytest.raises(InputError, match=f"{key} holds NaN or infinite values") as caught:
        load_classifier(run_copy)
    assert "\n" not in str(caught.value)


def test_eval_of_a_classifier_with_nan_weights_is_one_line_and_exit_2(run_copy: Path, builtin_dataset: Path,
                                                                       tmp_path: Path) -> None:
    _poison(run_copy, math.nan)
    result = CliRunner().invoke(main, ["eval", str(run_copy), "--test",
                                       f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}",
                                       "--out", str(tmp_path / "eval"), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "NaN" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_best_json_is_refused_not_waited_on(run_copy: Path) -> None:
    (run_copy / "best.json").unlink()
    os.mkfifo(run_copy / "best.json")
    code = ("from patchscope.common.errors import InputError\n"
            "from patchscope.forensics.checkpoint import load_classifier\n"
            "try:\n"
            f"    load_classifier({str(run_copy)!r})\n"
            "except InputError as error:\n"
            "    print(error)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("load_classifier waited on a FIFO named best.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best.json: a FIFO (named pipe), not a regular file" in done.stdout


def test_an_oversized_metadata_file_is_refused_unread(run_copy: Path) -> None:
    with open(run_copy / "best.json", "r+b") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MB that take no disk
    with pytest.raises(InputError, match="more than the 16777216 expected"):
        load_classifier(run_copy)
