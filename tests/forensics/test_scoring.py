"""Specification of forensics.scoring: aggregation, the patch loss, metrics, CSV tables and PR/ROC figures.

Expected numbers are worked out by hand in the comments; sklearn is the reference for AP and AUC.
"""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from patchscope.common.errors import InputError
from patchscope.forensics.scoring import (
    AGGREGATIONS,
    METRIC_COLUMNS,
    append_csv,
    compute_metrics,
    image_scores,
    patch_correct,
    patch_cross_entropy,
    patch_probabilities,
    plot_pr_curves,
    plot_roc_curves,
)

LN3 = math.log(3.0)


def two_patch_map() -> torch.Tensor:
    """A 1 x 2 x 1 x 2 logit map: patch A (real 0, fake ln 3) -> P(fake) 3/4; patch B a tie -> 1/2."""
    return torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]])


def test_patch_probabilities_are_softmax_fake_channel():
    probs = patch_probabilities(two_patch_map())
    assert probs.shape == (1, 1, 2)
    torch.testing.assert_close(probs, torch.tensor([[[0.75, 0.5]]]))


def test_after_softmax_averages_patch_probabilities():
    # (3/4 + 1/2) / 2
    torch.testing.assert_close(image_scores(two_patch_map(), "after_softmax"), torch.tensor([0.625]))


def test_after_softmax_is_the_default_aggregation():
    torch.testing.assert_close(image_scores(two_patch_map()), torch.tensor([0.625]))


def test_before_softmax_takes_softmax_of_mean_logits():
    # mean logits (0, ln 3 / 2) -> sqrt(3) / (1 + sqrt(3))
    expected = math.sqrt(3) / (1 + math.sqrt(3))
    torch.testing.assert_close(image_scores(two_patch_map(), "before_softmax"), torch.tensor([expected]))


def test_vote_counts_fake_patches_and_a_tie_counts_as_real():
    # patch A votes fake, patch B is a tie -> real: 1 of 2
    torch.testing.assert_close(image_scores(two_patch_map(), "vote"), torch.tensor([0.5]))
    all_ties = torch.zeros(3, 2, 4, 4)
    torch.testing.assert_close(image_scores(all_ties, "vote"), torch.zeros(3))


def test_every_aggregation_gives_one_score_per_image_in_unit_interval():
    logits = torch.randn(5, 2, 3, 4, generator=torch.Generator().manual_seed(0)) * 4
    for mode in AGGREGATIONS:
        scores = image_scores(logits, mode)
        assert scores.shape == (5,)
        assert bool(((scores >= 0) & (scores <= 1)).all())


def test_unknown_aggregation_lists_the_modes():
    with pytest.raises(ValueError, match="after_softmax, before_softmax, vote"):
        image_scores(two_patch_map(), "median")


def test_full_image_logits_count_as_one_patch():
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    torch.testing.assert_close(image_scores(logits), torch.tensor([0.75, 0.25]))


def test_patch_cross_entropy_by_hand():
    # label fake: -(ln 3/4 + ln 1/2) / 2 = ln(8/3) / 2; label real: -(ln 1/4 + ln 1/2) / 2 = ln 8 / 2
    logits = two_patch_map()
    torch.testing.assert_close(patch_cross_entropy(logits, torch.tensor([1])), torch.tensor(math.log(8 / 3) / 2))
    torch.testing.assert_close(patch_cross_entropy(logits, torch.tensor([0])), torch.tensor(math.log(8) / 2))
    both = logits.expand(2, 2, 1, 2)
    expected = (math.log(8 / 3) + math.log(8)) / 4
    torch.testing.assert_close(patch_cross_entropy(both, torch.tensor([1, 0])), torch.tensor(expected))


def test_patch_cross_entropy_equals_cross_entropy_on_expanded_labels_with_same_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 5, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0])
    ours = patch_cross_entropy(logits, labels)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(logits, labels[:, None, None].expand(4, 5, 3))
    (ref_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_grad, ref_grad)


def test_patch_cross_entropy_rejects_label_count_mismatch():
    with pytest.raises(ValueError, match="labels"):
        patch_cross_entropy(torch.zeros(2, 2, 3, 3), torch.tensor([1]))


def test_patch_correct_by_hand_with_ties_as_real():
    # each image has three patches: fake wins, tie, real wins
    row = torch.tensor([[[0.0, 1.0, 2.0]], [[2.0, 1.0, 0.0]]])
    logits = torch.stack([row, row])
    # image 0 is fake: only the first patch is right; image 1 is real: the tie and the last are right
    assert patch_correct(logits, torch.tensor([1, 0])) == (3, 6)
    correct, total = patch_correct(logits, torch.tensor([1, 0]))
    assert type(correct) is int and type(total) is int


SCORES = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2]
LABELS = [0, 0, 1, 1, 1, 0]


def test_metrics_match_sklearn_and_split_accuracy_by_class():
    metrics = compute_metrics(torch.tensor(SCORES), torch.tensor(LABELS))
    scores, labels = np.array(SCORES), np.array(LABELS)
    assert metrics["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["ap_real"] == pytest.approx(average_precision_score(labels, 1 - scores, pos_label=0))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, scores))
    # predicted fake: 0.8 and 0.6; the fake scored 0.35 is the only mistake
    assert metrics["acc"] == pytest.approx(5 / 6)
    assert metrics["acc_real"] == pytest.approx(1.0)
    assert metrics["acc_fake"] == pytest.approx(2 / 3)
    assert (metrics["n"], metrics["n_real"], metrics["n_fake"]) == (6, 3, 3)
    assert "patch_ap" not in metrics and "patch_acc" not in metrics


def test_ap_by_hand_and_ap_real_differs_from_ap():
    # ranked: fake 0.9, real 0.8, fake 0.7 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    # real positive, ranked by 1 - s: real 0.2 at rank 2 -> AP_real = 1/2
    metrics = compute_metrics([0.9, 0.8, 0.7], [1, 0, 1])
    assert metrics["ap"] == pytest.approx(5 / 6)
    assert metrics["ap_real"] == pytest.approx(1 / 2)


def test_score_of_exactly_one_half_is_predicted_real():
    metrics = compute_metrics([0.5, 0.5], [0, 1])
    assert metrics["acc_real"] == 1.0
    assert metrics["acc_fake"] == 0.0


def test_patch_metrics_label_every_patch_with_its_image():
    # patches: fake image [0.9, 0.4], real image [0.3, 0.6]
    probs = torch.tensor([[[0.9, 0.4]], [[0.3, 0.6]]])
    metrics = compute_metrics([0.65, 0.45], [1, 0], patch_probs=probs)
    assert metrics["patch_acc"] == pytest.approx(0.5)
    # ranked: 0.9 fake, 0.6 real, 0.4 fake, 0.3 real -> 1/2 * 1 + 1/2 * 2/3
    assert metrics["patch_ap"] == pytest.approx(5 / 6)
    assert metrics["patch_ap"] == pytest.approx(average_precision_score([1, 0, 1, 0], [0.9, 0.6, 0.4, 0.3]))


def test_patch_ap_real_takes_real_patches_as_positive_and_differs_from_patch_ap():
    # patches (1 x 2 per image): fake A [0.9, 0.7], fake B [0.6, 0.5], real C [0.8, 0.1]
    probs = np.array([[[0.9, 0.7]], [[0.6, 0.5]], [[0.8, 0.1]]])
    metrics = compute_metrics([0.8, 0.55, 0.45], [1, 1, 0], patch_probs=probs)
    # fake positive, ranked by P(fake): f .9, r .8, f .7, f .6, f .5, r .1 -> (1 + 2/3 + 3/4 + 4/5) / 4
    assert metrics["patch_ap"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    # real positive, ranked by 1 - P(fake): r .9, f .5, f .4, f .3, r .2, f .1 -> (1 + 2/5) / 2
    assert metrics["patch_ap_real"] == pytest.approx(0.7)
    # sklearn, on the patches listed by hand: real = 1 and score 1 - p
    patch_real = [0, 0, 0, 0, 1, 1]
    patch_p_real = [1 - 0.9, 1 - 0.7, 1 - 0.6, 1 - 0.5, 1 - 0.8, 1 - 0.1]
    assert metrics["patch_ap_real"] == pytest.approx(average_precision_score(patch_real, patch_p_real))
    assert metrics["patch_ap"] != pytest.approx(metrics["patch_ap_real"])


def test_older_metrics_table_is_rewritten_under_the_new_header(tmp_path):
    path = tmp_path / "metrics.csv"
    old = [c for c in METRIC_COLUMNS if c != "patch_ap_real"]
    path.write_text(",".join(old) + "\n" + ",".join("r" if c == "run" else "0.5" if c == "patch_ap" else ""
                                                    for c in old) + "\n")
    append_csv(path, [{"run": "new", "patch_ap": 0.25, "patch_ap_real": 0.75}])
    assert path.read_text().splitlines()[0] == ",".join(METRIC_COLUMNS)
    rows = read_table(path)
    assert [(r["run"], r["patch_ap"], r["patch_ap_real"]) for r in rows] == [("r", "0.5", ""), ("new", "0.25", "0.75")]


def test_single_class_gives_nan_ranking_metrics_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = compute_metrics([0.9, 0.3, 0.7], [1, 1, 1], patch_probs=np.full((3, 2, 2), 0.8))
    for key in ("ap", "ap_real", "roc_auc", "patch_ap", "patch_ap_real", "acc_real"):
        assert math.isnan(metrics[key]), key
    assert metrics["acc_fake"] == pytest.approx(2 / 3)
    assert metrics["acc"] == pytest.approx(2 / 3)
    assert metrics["patch_acc"] == 1.0
    assert (metrics["n_real"], metrics["n_fake"]) == (0, 3)
    json.dumps(metrics)  # NaN still serialises (as JSON's NaN extension)


def test_metrics_are_plain_python_numbers_and_json_serialisable():
    probs = torch.rand(6, 2, 2, generator=torch.Generator().manual_seed(2))
    metrics = compute_metrics(torch.tensor(SCORES, dtype=torch.float16), torch.tensor(LABELS), patch_probs=probs)
    assert all(type(value) in (int, float) for value in metrics.values())
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_metrics_reject_labels_other_than_zero_and_one():
    with pytest.raises(ValueError, match="0 \\(real\\) or 1 \\(fake\\)"):
        compute_metrics([0.1, 0.9], [0, 2])


def read_table(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_append_writes_header_once_and_keeps_rows(tmp_path):
    path = tmp_path / "results.csv"
    first = {"test_set": "pgan", **compute_metrics(SCORES, LABELS)}
    append_csv(path, [first])
    append_csv(path, [{"test_set": "glow", "ap": 0.5, "n": 4}])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS)
    assert sum(line == lines[0] for line in lines) == 1
    rows = read_table(path)
    assert [row["test_set"] for row in rows] == ["pgan", "glow"]
    assert float(rows[0]["ap"]) == pytest.approx(first["ap"])
    assert int(rows[0]["n_fake"]) == 3
    assert rows[1]["roc_auc"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left behind


def test_csv_append_to_file_with_other_header_names_the_file(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("name,score\na,1\n")
    with pytest.raises(InputError, match="other.csv"):
        append_csv(path, [{"ap": 1.0}])
    assert path.read_text() == "name,score\na,1\n"


def test_csv_append_rejects_unknown_columns(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        append_csv(tmp_path / "results.csv", [{"bogus": 1}])
    assert not (tmp_path / "results.csv").exists()


def assert_valid_png(path):
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 200
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 0  # something was drawn


def test_pr_curves_are_saved_as_png(tmp_path):
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 20 + [1] * 20)
    curves = {
        "pgan": (labels + 0.8 * torch.rand(40, generator=gen), labels),
        "glow": (torch.rand(40, generator=gen), labels),
        "reals only": (torch.rand(5, generator=gen), torch.zeros(5)),
    }
    path = tmp_path / "figures" / "pr.png"
    plot_pr_curves(curves, path)
    assert_valid_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["pr.png"]


def test_roc_curves_are_saved_as_png(tmp_path):
    path = tmp_path / "roc.png"
    plot_roc_curves({"pgan": (SCORES, LABELS)}, path)
    assert_valid_png(path)


def test_figure_with_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(InputError, match="pr.jpg"):
        plot_pr_curves({"pgan": (SCORES, LABELS)}, tmp_path / "pr.jpg")
