"""The command line: help with examples, one-line errors with exit code 2, train -> eval (the demo: analysis/test_demo)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from patchscope.cli import main

COMMANDS = sorted(main.commands)  # every registered command, so a new one cannot miss these checks


def test_the_commands_are_registered():
    assert {"train", "eval", "patches", "spectra", "sample", "prepare", "train-gan", "invert", "exaggerate",
            "finetune", "retrain", "report", "models", "demo", "score", "table"} <= set(COMMANDS)


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_an_example(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "patchscope" in result.output


def test_missing_folder_is_one_line_and_exit_code_2(tmp_path):
    result = run("train", "--real", str(tmp_path / "nope"), "--fake", str(tmp_path / "nope2"),
                 "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert "Traceback" not in result.output


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    result = run("train", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "real" in result.stderr


def test_images_smaller_than_the_receptive_field_are_refused(tmp_path):
    from PIL import Image

    for kind in ("real", "fake"):
        for split in ("train", "val"):
            folder = tmp_path / kind / split
            folder.mkdir(parents=True)
            Image.new("RGB", (12, 12), (10, 20, 30)).save(folder / "a.png")
    result = run("train", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--out", str(tmp_path / "run"), "--model", "xception_block1", "--crop-size", "32",
                 "--load-size", "32")
    assert result.exit_code == 2
    assert "a.png" in result.stderr and "receptive field" in result.stderr


def test_eval_of_something_that_is_not_a_run_is_refused(tmp_path):
    result = run("eval", str(tmp_path), "--test", f"x={tmp_path},{tmp_path}")
    assert result.exit_code == 2 and "best.safetensors" in result.stderr


def test_bad_test_spec_is_refused(tmp_path):
    result = run("eval", str(tmp_path), "--test", "no-equals-sign")
    assert result.exit_code == 2 and "NAME=REAL_DIR,FAKE_DIR" in result.stderr


def test_unknown_config_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  modle: xception_block1\n")
    result = run("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "unknown setting 'modle'" in result.stderr


def test_train_then_eval_from_the_command_line(builtin_dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: xception_block1\n  init: kaiming\n  max_epochs: 2\n")
    result = run("train", "--config", str(config), "--real", str(builtin_dataset / "real"),
                 "--fake", str(builtin_dataset / "fake"), "--out", str(tmp_path / "run"),
                 "--load-size", "32", "--crop-size", "32", "--batch-size", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "model: xception_block1" in saved and "batch_size: 16" in saved  # YAML and flags resolved
    result = run("eval", str(tmp_path / "run"), "--test", f"a={builtin_dataset / 'real'},{builtin_dataset / 'fake'}",
                 "--test", f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:3]]
    assert [row[0] for row in rows] == ["a", "b"] and rows[0][1:] == rows[1][1:]
    result = run("eval", str(tmp_path / "run"), "--test", f"a={builtin_dataset / 'real'},{builtin_dataset / 'fake'}")
    assert result.exit_code == 2 and "--force" in result.stderr
    result = run("eval", str(tmp_path / "run"), "--test", f"a={builtin_dataset / 'real'},{builtin_dataset / 'fake'}",
                 "--force", "--heatmaps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "eval" / "heatmaps" / "a" / "heatmaps.html").is_file()
    result = run("patches", str(tmp_path / "run"), "--real", str(builtin_dataset / "real"),
                 "--fake", str(builtin_dataset / "fake"), "-n", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "flat" in result.stdout and (tmp_path / "run" / "patches" / "patches.json").is_file()
