"""Early stopping: the `patience` rule and the public code's (`public`: more than 5 x patience epochs since the
best, or one epoch after the validation patch accuracy reached 1.0), max_epochs a hard limit under both; one
decision for `advance` and for `restore`'s reopening of a finished run resumed with other limits or another rule;
the option on the command line and in the paper configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common import config as configs
from patchscope.common.errors import InputError
from patchscope.forensics import train as train_mod
from patchscope.forensics.builtin_images import write_builtin_dataset
from patchscope.forensics.train import RESUMABLE_CHANGES, TrainConfig, Training, fit, stop_reason

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def settings(**changes) -> TrainConfig:
    base = dict(model="xception_block1", load_size=24, crop_size=24, batch_size=4, max_epochs=100, patience=2,
                device="cpu", precision="fp32", init="kaiming", workers=0)
    return TrainConfig(**{**base, **changes})


def stops_after(accuracies: list[float], **changes) -> tuple[int | None, str | None]:
    """Feed validation patch accuracies epoch by epoch to `Training.advance`; (epoch it stopped after, reason)."""
    run = Training(settings(**changes))
    for epoch, acc in enumerate(accuracies, 1):
        record: dict = {}
        run.advance(epoch, record, {"patch_acc": acc, "ap": 0.5, "acc": 0.5})
        assert record["epochs_since_best"] == run.state["since_best"]
        if run.state["finished"]:
            return epoch, run.state["stop_reason"]
    return None, None


def test_patience_rule_stops_after_patience_epochs_without_a_strictly_higher_accuracy():
    assert stops_after([0.5, 0.6, 0.6, 0.55], patience=2) == (4, "no improvement for 2 epochs")
    assert stops_after([0.5, 0.6, 0.7, 0.8, 0.9], patience=2) == (None, None)
    # 1.0 is nothing special to it: it waits the patience out
    assert stops_after([0.5, 1.0, 1.0], patience=2) == (None, None)
    assert stops_after([0.5, 1.0, 1.0, 1.0], patience=2)[0] == 4


def test_public_rule_waits_more_than_five_times_the_patience():
    epoch, reason = stops_after([0.5] + [0.4] * 20, early_stopping="public", patience=2)
    assert epoch == 12  # epoch > best epoch (1) + 5 x 2, as the public code's `elif epoch > best_val_ep + 5*patience`
    assert "no improvement for 11 epochs" in reason and "early_stopping=public" in reason
    # an improvement restarts the count
    assert stops_after([0.5, 0.4, 0.4, 0.6] + [0.6] * 20, early_stopping="public", patience=1)[0] == 4 + 6


def test_public_rule_stops_one_epoch_after_the_accuracy_reached_one():
    for after in (1.0, 0.9):
        epoch, reason = stops_after([0.5, 1.0, after, 0.2], early_stopping="public", patience=50)
        assert epoch == 3 and "reached 1.0 at epoch 2" in reason
    assert stops_after([1.0, 1.0], early_stopping="public", patience=50)[0] == 2
    assert stops_after([0.5, 0.99, 0.999], early_stopping="public", patience=50) == (None, None)


@pytest.mark.parametrize("rule", ["patience", "public"])
def test_max_epochs_is_a_hard_limit_under_both_rules(rule):
    assert stops_after([0.1, 0.2, 0.3, 0.4], early_stopping=rule, max_epochs=3) == (3, "reached max_epochs=3")
    assert stop_reason(settings(early_stopping=rule, max_epochs=3), 3, 0, 1.0) == "reached max_epochs=3"


def test_per_model_patience_applies_to_the_public_rule():
    config = settings(patience=None, early_stopping="public", max_epochs=1000)  # 50 for xception_block1
    assert stop_reason(config, 251, 250, 0.9) is None
    assert stop_reason(config, 252, 251, 0.9) is not None


def test_the_rule_is_checked_where_the_config_is_built_and_may_change_on_resume():
    with pytest.raises(InputError, match="early_stopping='paper': expected one of patience, public"):
        settings(early_stopping="paper")
    assert "early_stopping" in RESUMABLE_CHANGES and TrainConfig().early_stopping == "patience"


@pytest.mark.parametrize("name", ["paper_xception_block2.yaml", "paper_celebahq_pgan.yaml",
                                  "paper_training_sets.yaml"])
def test_the_paper_configs_train_with_the_public_rule(name):
    assert configs.read_yaml(CONFIGS / name, "train")["early_stopping"] == "public"


# ----------------------------------------------------------------------------- through fit and resume

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_builtin_dataset(tmp_path_factory.mktemp("tiny"), {"train": 4, "val": 2, "test": 2}, size=24)


@pytest.fixture
def scripted(monkeypatch):
    """Validation returns the accuracies of `script` (epoch -> patch accuracy, else 0.5) instead of measuring."""
    script: dict[int, float] = {}

    def validate(self):
        epoch = self.state["epoch"] + 1  # validate runs before advance counts the epoch
        return {"patch_acc": script.get(epoch, 0.5), "ap": 0.5, "acc": 0.5}

    monkeypatch.setattr(train_mod.Training, "validate", validate)
    return script


def run_config(data: Path, out: Path, **changes) -> TrainConfig:
    return settings(real=str(data / "real"), fake=str(data / "fake"), out=str(out), **changes)


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fit_stops_by_the_chosen_rule(tiny, tmp_path, scripted):
    scripted.update({2: 1.0})
    public = fit(run_config(tiny, tmp_path / "public", early_stopping="public", patience=5))
    assert (public["epochs"], public["best_epoch"], public["best_val_patch_acc"]) == (3, 2, 1.0)
    assert "reached 1.0" in public["stop_reason"] and epochs_logged(tmp_path / "public") == [1, 2, 3]
    patience = fit(run_config(tiny, tmp_path / "patience", patience=2))
    assert patience["epochs"] == 4 and patience["stop_reason"] == "no improvement for 2 epochs"


def test_resume_reopens_a_run_exactly_when_the_new_rule_goes_on(tiny, tmp_path, scripted):
    out = tmp_path / "run"
    first = fit(run_config(tiny, out, patience=1))  # flat 0.5: best at 1, stops after 2
    assert (first["epochs"], first["finished"]) == (2, True)
    # public with patience 1: more than 5 epochs since epoch 1 -> goes on to epoch 7
    second = fit(run_config(tiny, out, patience=1, early_stopping="public"), resume=True)
    assert second["epochs"] == 7 and "more than 5 x patience" in second["stop_reason"]
    assert epochs_logged(out) == list(range(1, 8))
    # back to the patience rule: 6 epochs since the best is past it, so the finished run stays as it is
    before = (out / "last.safetensors").read_bytes()
    third = fit(run_config(tiny, out, patience=1), resume=True)
    assert third["epochs"] == 7 and third["finished"] and (out / "last.safetensors").read_bytes() == before
    # a larger patience under the patience rule reopens it; max_epochs still bounds it
    fourth = fit(run_config(tiny, out, patience=10, max_epochs=9), resume=True)
    assert fourth["epochs"] == 9 and fourth["stop_reason"] == "reached max_epochs=9"


def test_a_run_cut_short_stops_at_once_when_the_resume_lowered_its_limit(tiny, tmp_path, scripted):
    """Killed 3 epochs past its best, resumed with patience 2: it has met the new rule and trains no epoch more."""
    out = tmp_path / "run"

    def interrupt(record):
        if record["epoch"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(run_config(tiny, out, patience=10), on_epoch_end=interrupt)
    before = (out / "last.safetensors").read_bytes()
    resumed = fit(run_config(tiny, out, patience=2), resume=True)
    assert (resumed["epochs"], resumed["finished"]) == (4, True) and resumed["stop_reason"] == "no improvement for 2 epochs"
    assert epochs_logged(out) == [1, 2, 3, 4] and (out / "last.safetensors").read_bytes() == before


def test_a_run_stopped_at_one_reopens_under_the_patience_rule(tiny, tmp_path, scripted):
    scripted.update({1: 1.0})
    out = tmp_path / "run"
    assert fit(run_config(tiny, out, early_stopping="public"))["epochs"] == 2
    assert fit(run_config(tiny, out, early_stopping="public", max_epochs=50), resume=True)["epochs"] == 2
    resumed = fit(run_config(tiny, out, patience=3), resume=True)
    assert resumed["epochs"] == 4 and resumed["best_epoch"] == 1


def test_cli_takes_early_stopping_and_init():
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--real", "r", "--fake", "f", "--out", "o", "--early-stopping", "public",
                                  "--init", "kaiming", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "early_stopping: public" in result.output and "init: kaiming" in result.output
    assert runner.invoke(main, ["train", "--early-stopping", "paper", "--dry-run"]).exit_code == 2
    help_text = " ".join(runner.invoke(main, ["train", "--help"]).output.split())
    assert "more than 5 x --patience" in help_text and "reached 1.0" in help_text
    assert "xavier-normal with gain 0.02" in help_text and "N(1, 0.02)" in help_text
