"""Exaggeration on a saturated classifier: the mean log-odds of P(fake) is reported beside P(fake) (metrics
files and the printed table), and a k = 0 mean P(fake) near 0 or 1 is named in one warning line."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from patchscope.analysis.shift_grid import ExaggerateConfig, rows_with_logits, run_exaggerate, warn_if_saturated
from patchscope.attacks.shift import ShiftSweep
from patchscope.cli.attack import _shift_table
from patchscope.forensics.checkpoint import save_classifier
from patchscope.generators.pgan.zoo import save_pgan_zoo
from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

KS = [-2.0, -1.0, 0.0, 1.0, 2.0]


def _study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: float) -> dict:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS weights: lam 0, no LPIPS
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    # The last layer's bias pushes every patch's logit up by `offset`: P(fake) pinned near 1.
    save_classifier(tmp_path / "classifier" / "best", brightness_classifier(offset=offset),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    config = ExaggerateConfig(generator=str(tmp_path / "pgan.pt"), classifier=str(tmp_path / "classifier"),
                              out=str(tmp_path / "out"), lam=0.0, steps=40, batch_size=8, lr=0.02, eval_n=16,
                              grid_rows=0, ks=KS, device="cpu", precision="fp32")
    return run_exaggerate(config)


def test_a_saturated_classifier_is_warned_about_and_its_logits_spread_out(tmp_path, monkeypatch, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="patchscope.exaggerate"):
        summary = _study(tmp_path, monkeypatch, offset=6.0)
    rows = summary["rows"]
    original = rows[KS.index(0.0)]
    assert original["p_fake"] > 0.99
    warnings = [r.getMessage() for r in caplog.records if "saturated" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"classifier saturated at the original samples (P(fake) {original['p_fake']:.4f})")
    assert "compare logits" in warnings[0]

    p_fake, logits = [r["p_fake"] for r in rows], [r["logit"] for r in rows]
    assert p_fake == sorted(p_fake) and logits == sorted(logits), (p_fake, logits)
    assert logits[-1] - logits[0] > 50 * (p_fake[-1] - p_fake[0])  # the logits are not squeezed against 1

    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == rows and "log(p / (1 - p))" in metrics["logit"]
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["k", "n", "p_fake", "p_fake_std", "logit", "logit_std"]
    assert [float(row["logit"]) for row in table] == pytest.approx(logits, rel=1e-12)

    printed = _shift_table(summary).splitlines()
    assert printed[0].split()[:4] == ["k", "P(fake)", "logit", "LPIPS"] and "mean log-odds" in printed[0]
    assert printed[1 + KS.index(0.0)].split()[:3] == ["0", f"{original['p_fake']:.4f}", f"{original['logit']:.3f}"]


def test_an_unsaturated_classifier_gives_no_warning(tmp_path, monkeypatch, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="patchscope.exaggerate"):
        summary = _study(tmp_path, monkeypatch, offset=0.0)
    assert 0.01 < summary["rows"][KS.index(0.0)]["p_fake"] < 0.99
    assert not [r for r in caplog.records if "saturated" in r.getMessage()]


@pytest.mark.parametrize("p, warned", [(0.995, True), (0.005, True), (0.5, False), (0.99, False)])
def test_saturation_is_judged_at_k_zero(p: float, warned: bool, caplog) -> None:
    rows = [{"k": -1.0, "p_fake": 0.5, "logit": 0.0}, {"k": 0.0, "p_fake": p, "logit": math.log(p / (1 - p))}]
    with caplog.at_level(logging.WARNING, logger="patchscope.exaggerate"):
        warn_if_saturated(rows)
        warn_if_saturated([rows[0]])  # no k = 0 column: nothing to judge
    assert len(caplog.records) == warned


def test_logits_are_the_mean_log_odds_of_each_sample_and_stay_finite_at_0_and_1() -> None:
    p = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.6, 0.99], [0.0, 0.5, 1.0]])
    rows = rows_with_logits(ShiftSweep((-1.0, 0.0, 1.0), p, None))
    assert list(rows[0]) == ["k", "n", "p_fake", "p_fake_std", "logit", "logit_std"]
    expected = (math.log(0.1 / 0.9) + math.log(0.2 / 0.8) + math.log(2.0 ** -24 / (1 - 2.0 ** -24))) / 3
    assert rows[0]["logit"] == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(row["logit"]) for row in rows)
    assert [row["logit"] for row in rows] == sorted(row["logit"] for row in rows)
