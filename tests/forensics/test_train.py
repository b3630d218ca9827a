"""Training: learning an easy split, early stopping, checkpoints, resume and run-directory rules."""
from __future__ import annotations

import json
import re

import pytest
import torch

from patchscope.common.errors import InputError
from patchscope.forensics import checkpoint
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.train import TrainConfig, fit


def tiny_config(dataset, out, **overrides) -> TrainConfig:
    settings = dict(real=str(dataset / "real"), fake=str(dataset / "fake"), out=str(out),
                    model="xception_block1", load_size=32, crop_size=32, batch_size=16,
                    max_epochs=3, patience=10, device="cpu", seed=0, init="kaiming",
                    precision="fp32")  # the same numbers whatever the CPU's bf16 support
    settings.update(overrides)
    return TrainConfig(**settings)


def test_tiny_run_learns_an_easy_split_to_high_ap(builtin_dataset, tmp_path):
    summary = fit(tiny_config(builtin_dataset, tmp_path / "run", max_epochs=20))
    assert summary["finished"] and summary["epochs"] == 20
    result = evaluate(EvalConfig(run=str(tmp_path / "run"),
                                 tests=[f"easy={builtin_dataset / 'real'},{builtin_dataset / 'fake'}"],
                                 device="cpu"))
    metrics = result["results"]["easy"]["after_softmax"]
    assert metrics["ap"] > 0.95
    assert metrics["n_real"] == 48 and metrics["n_fake"] == 48
    out = tmp_path / "run" / "eval"
    for name in ("metrics.json", "metrics.csv", "pr_curve.png", "scores_easy.csv", "config.yaml"):
        assert (out / name).is_file(), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 21))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_interruption_gives_the_same_weights_as_an_uninterrupted_run(builtin_dataset, tmp_path,
                                                                                  precision):
    fit(tiny_config(builtin_dataset, tmp_path / "straight", precision=precision))

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config(builtin_dataset, tmp_path / "resumed", precision=precision), on_epoch_end=interrupt)
    summary = fit(tiny_config(builtin_dataset, tmp_path / "resumed", precision=precision), resume=True)
    assert summary["epochs"] == 3
    for which in ("last", "best"):
        a, meta_a = checkpoint.load_classifier(tmp_path / "straight", which)
        b, meta_b = checkpoint.load_classifier(tmp_path / "resumed", which)
        assert meta_a["epoch"] == meta_b["epoch"]
        for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), key
    log = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    straight, resumed = log("straight"), log("resumed")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert [r["train_loss"] for r in straight] == [r["train_loss"] for r in resumed]


def test_early_stopping_waits_exactly_patience_epochs_without_improvement(builtin_dataset, tmp_path):
    # lr 0: the weights never change, so epoch 1 is the best and no later epoch improves on it.
    summary = fit(tiny_config(builtin_dataset, tmp_path / "run", lr=1e-12, max_epochs=20, patience=2))
    assert summary["best_epoch"] == 1 and summary["epochs"] == 3
    assert "no improvement for 2 epochs" in summary["stop_reason"]


def test_existing_run_is_refused_without_resume_and_a_finished_run_is_not_retrained(builtin_dataset, tmp_path):
    cfg = tiny_config(builtin_dataset, tmp_path / "run", max_epochs=1)
    fit(cfg)
    with pytest.raises(InputError, match="already holds a run; pass --resume"):
        fit(cfg)
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    assert fit(cfg, resume=True)["epochs"] == 1
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == before


def test_resume_refuses_a_changed_model(builtin_dataset, tmp_path):
    fit(tiny_config(builtin_dataset, tmp_path / "run", max_epochs=1))
    with pytest.raises(InputError, match="cannot resume with different model"):
        fit(tiny_config(builtin_dataset, tmp_path / "run", model="resnet18_layer1"), resume=True)


@pytest.mark.parametrize("field, value, expected", [
    ("batch_size", 15, "batch_size=15: expected an even integer >= 2"),
    ("batch_size", 0, "batch_size=0: expected an even integer >= 2"),
    ("lr", 0.0, "lr=0.0: expected a finite number > 0"),
    ("lr", float("nan"), "lr=nan: expected a finite number > 0"),
    ("beta2", 1.0, "beta2=1.0: expected a finite number >= 0 and < 1"),
    ("model", "xception_block9", "model='xception_block9': expected one of "),
    ("load_size", "299", "load_size='299': expected an integer >= 1 and <= 8192 or null"),
    ("crop_size", 9000, "crop_size=9000: expected an integer >= 1 and <= 8192 or null"),
    ("workers", -1, "workers=-1: expected an integer >= 0 or null"),
    ("precision", "fp16", "precision='fp16': expected one of auto, fp32, bf16"),
    ("cache", "yes", "cache='yes': expected true or false or null"),
])
def test_bad_settings_are_refused_where_the_config_is_built(builtin_dataset, tmp_path, field, value, expected):
    """Settings are checked once, when the config is built, from a YAML file or flags alike."""
    with pytest.raises(InputError, match=re.escape(expected)):
        tiny_config(builtin_dataset, tmp_path / "run", **{field: value})
    assert not (tmp_path / "run").exists()
