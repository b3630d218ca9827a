"""crop_on in whole runs: `fit`, `eval` and their torchrun forms give byte-identical weights, metrics and scores with
crop_on host and device (fp32 on CPU, device mode forced); crop_on is a setting of how a run goes, so a run may be
resumed with the other one; the command line and YAML take it and refuse what it is not.

The per-batch comparisons are in test_device_crop.py; these catch what they cannot: a consumer (training loop,
validation, eval, a torchrun rank) that does not hand device batches to `to_device_batch`, or hands them another
layout or label order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from patchscope.cli import main
from patchscope.common.errors import InputError
from patchscope.forensics import device_crop
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.evaluate import EvalConfig
from patchscope.forensics.train import RESUMABLE_CHANGES, TrainConfig, fit

TIMINGS = ("seconds", "images_per_s")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """28 px squares: 8 real and 8 fake to train on, 5 + 5 to validate (3 per batch: a short last batch)."""
    return write_builtin_dataset(tmp_path_factory.mktemp("tiny"), {"train": 8, "val": 5, "test": 5}, size=28)


def config(data: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(real=str(data / "real"), fake=str(data / "fake"), out=str(out), model="xception_block1",
                    load_size=26, crop_size=22, batch_size=4, eval_batch_size=3, max_epochs=2, device="cpu",
                    precision="fp32", init="kaiming", workers=0)
    return TrainConfig(**{**settings, **changes})


@pytest.fixture
def crops(monkeypatch) -> list[int]:
    """Sizes of the batches cropped by `device_crop.crop_batch`: device mode was really used, and by whom."""
    calls, crop_batch = [], device_crop.crop_batch

    def counted(pixels, *args, **kwargs):
        calls.append(len(pixels))
        return crop_batch(pixels, *args, **kwargs)

    monkeypatch.setattr(device_crop, "crop_batch", counted)
    return calls


def assert_same_runs(a: Path, b: Path) -> None:
    """Weights bit for bit (best and last), and every logged figure but the timings."""
    for which in ("last", "best"):
        x, y = load_file(a / f"{which}.safetensors"), load_file(b / f"{which}.safetensors")
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].numpy().tobytes() == y[key].numpy().tobytes(), (which, key)
    logs = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    assert logs[0] == logs[1] and len(logs[0]) == 2


RUNS = {"random crop + flip, channels_last": {},
        "blur + jpeg + random resized crop, contiguous, 2 workers": dict(
            augment="blur_jpeg_0.5", random_resized_crop=True, channels_last=False, workers=2)}


@pytest.mark.parametrize("case", list(RUNS))
def test_fit_trains_the_same_weights_with_either_crop(tiny, tmp_path, case, crops):
    fit(config(tiny, tmp_path / "host", crop_on="host", **RUNS[case]))
    assert crops == []
    fit(config(tiny, tmp_path / "device", crop_on="device", **RUNS[case]))
    assert crops == 2 * ([4] * 4 + [3, 3, 3, 1])  # per epoch: 4 training steps, then 4 validation batches
    assert_same_runs(tmp_path / "host", tmp_path / "device")
    recorded = yaml.safe_load((tmp_path / "device" / "config.yaml").read_text())
    assert recorded["crop_on"] == "device"


def test_a_run_started_on_the_host_resumes_with_device_crops_and_the_same_weights(tiny, tmp_path):
    assert "crop_on" in RESUMABLE_CHANGES
    fit(config(tiny, tmp_path / "straight", crop_on="host"))
    fit(config(tiny, tmp_path / "resumed", crop_on="host", max_epochs=1))
    fit(config(tiny, tmp_path / "resumed", crop_on="device"), resume=True)
    assert_same_runs(tmp_path / "straight", tmp_path / "resumed")


def eval_args(run: Path, data: Path, out: Path, mode: str) -> list[str]:
    return ["eval", str(run), "--test", f"t={data / 'real'},{data / 'fake'}", "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--batch-size", "3", "--crop-on", mode]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    fit(config(tiny, out, max_epochs=1))
    return out


def test_eval_writes_the_same_metrics_and_scores_with_either_crop(tiny, trained, tmp_path, crops):
    for mode in ("host", "device"):
        result = CliRunner().invoke(main, eval_args(trained, tiny, tmp_path / mode, mode), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert crops == ([] if mode == "host" else [3, 3, 3, 1])
    for name in ("metrics.json", "scores_t.csv"):
        assert (tmp_path / "host" / name).read_bytes() == (tmp_path / "device" / name).read_bytes(), name
    assert yaml.safe_load((tmp_path / "device" / "config.yaml").read_text())["crop_on"] == "device"


def test_the_command_line_and_yaml_take_crop_on_and_refuse_other_values(tiny, tmp_path):
    runner = CliRunner()
    base = ["train", "--real", str(tiny / "real"), "--fake", str(tiny / "fake"), "--out", str(tmp_path / "run")]
    printed = lambda *args: yaml.safe_load(runner.invoke(main, [*args, "--dry-run"]).stdout)["crop_on"]  # noqa: E731
    assert printed(*base) == "auto" and printed(*base, "--crop-on", "device") == "device"
    settings = tmp_path / "settings.yaml"
    settings.write_text("train:\n  crop_on: host\neval:\n  crop_on: device\n")
    assert printed(*base, "--config", str(settings)) == "host"
    assert printed("eval", "RUN", "--test", "a=r,f", "--config", str(settings)) == "device"
    assert printed("eval", "RUN", "--test", "a=r,f", "--crop-on", "host") == "host"
    result = runner.invoke(main, [*base, "--crop-on", "gpu", "--dry-run"])
    assert result.exit_code == 2 and "--crop-on" in result.output
    settings.write_text("train:\n  crop_on: gpu\n")
    result = runner.invoke(main, [*base, "--config", str(settings), "--dry-run"])
    assert result.exit_code == 2 and "crop_on" in result.output
    for make in (lambda: TrainConfig(crop_on="gpu"), lambda: EvalConfig(crop_on="cuda")):
        with pytest.raises(InputError, match="crop_on"):
            make()
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- torchrun

def _torchrun(args: list[str]) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", "--no-python", str(BIN / "patchscope"),
               "--threads", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow  # four torchrun launches
def test_torchrun_ranks_crop_on_the_device_as_on_the_host(tiny, trained, tmp_path):
    """Each rank's share of the global batch and of the eval set, cropped on the device: the host run's bytes."""
    for mode in ("host", "device"):
        _torchrun(["train", "--real", str(tiny / "real"), "--fake", str(tiny / "fake"), "--out", str(tmp_path / mode),
                   "--model", "xception_block1", "--load-size", "26", "--crop-size", "22", "--batch-size", "8",
                   "--max-epochs", "2", "--device", "cpu", "--precision", "fp32", "--init", "kaiming",
                   "--workers", "0", "--crop-on", mode])
        _torchrun(eval_args(trained, tiny, tmp_path / f"eval_{mode}", mode))
    assert_same_runs(tmp_path / "host", tmp_path / "device")
    for name in ("metrics.json", "scores_t.csv"):
        assert (tmp_path / "eval_host" / name).read_bytes() == (tmp_path / "eval_device" / name).read_bytes()
