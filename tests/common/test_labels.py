"""Specification of common.labels: real = 0, fake = 1, P(fake) = softmax probability of logit channel 1.

Expected numbers are worked out by hand in the comments; the pipeline test checks that training,
evaluation and the analysis read a real model's logits through the same convention.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchscope.common.labels import (FAKE, LABEL_NAMES, LABELS, NUM_CLASSES, REAL, fake_wins, p_fake,
                                      patch_targets, targets)

LN3 = math.log(3.0)


def test_the_convention():
    assert (REAL, FAKE, NUM_CLASSES) == (0, 1, 2)
    assert LABELS == (0, 1)
    assert LABEL_NAMES[REAL] == "real" and LABEL_NAMES[FAKE] == "fake"


def test_p_fake_is_the_softmax_of_the_fake_channel_by_hand():
    # logits (real, fake): (0, ln 3) -> 3/4; (ln 3, 0) -> 1/4; a tie -> 1/2; (0, 100) -> 1
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0], [2.0, 2.0], [0.0, 100.0]])
    torch.testing.assert_close(p_fake(logits), torch.tensor([0.75, 0.25, 0.5, 1.0]))


def test_p_fake_of_a_patch_map_keeps_the_cells():
    # one image, 1 x 2 cells: cell A (0, ln 3) -> 3/4, cell B (ln 3, 0) -> 1/4
    logits = torch.tensor([[[[0.0, LN3]], [[LN3, 0.0]]]])
    probs = p_fake(logits)
    assert probs.shape == (1, 1, 2)
    torch.testing.assert_close(probs, torch.tensor([[[0.75, 0.25]]]))


def test_p_fake_is_bit_identical_to_softmax_then_channel_one():
    logits = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0)) * 7
    assert torch.equal(p_fake(logits), torch.softmax(logits, dim=1)[:, 1])


def test_fake_wins_is_strict_so_a_tie_counts_as_real():
    logits = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    assert fake_wins(logits).tolist() == [True, False, False]


def test_targets_are_int64_copies_of_one_label():
    assert targets(3, FAKE).tolist() == [1, 1, 1]
    assert targets(2, REAL).tolist() == [0, 0]
    assert targets(2, REAL).dtype == torch.long
    assert targets(0, FAKE).shape == (0,)
    # what the attacks built before: torch.full with an int fill value
    assert torch.equal(targets(4, FAKE), torch.full((4,), FAKE))


@pytest.mark.parametrize("label", [2, -1, 0.5])
def test_targets_refuse_other_labels(label):
    with pytest.raises(ValueError, match="label"):
        targets(1, label)


def test_patch_targets_give_every_cell_its_image_label():
    expanded = patch_targets(torch.tensor([FAKE, REAL]), 2, 3)
    assert expanded.shape == (2, 2, 3) and expanded.dtype == torch.long
    assert expanded[0].unique().tolist() == [1] and expanded[1].unique().tolist() == [0]


def test_cross_entropy_towards_fake_is_minus_log_p_fake_by_hand():
    # one patch with logits (0, ln 3): P(fake) = 3/4, so the loss towards FAKE is ln(4/3), towards REAL ln 4
    logits = torch.tensor([[[[0.0]], [[LN3]]]])
    towards_fake = F.cross_entropy(logits, patch_targets(targets(1, FAKE), 1, 1))
    towards_real = F.cross_entropy(logits, patch_targets(targets(1, REAL), 1, 1))
    torch.testing.assert_close(towards_fake, torch.tensor(math.log(4 / 3)))
    torch.testing.assert_close(towards_real, torch.tensor(math.log(4)))


def test_a_model_scoring_pipeline_agrees_with_the_convention():
    """Training loss, validation accuracy, evaluation scores and metrics all read one model's logits the same way."""
    from patchscope.forensics.evaluate import predict
    from patchscope.forensics.models import build_model
    from patchscope.forensics.scoring import (compute_metrics, image_scores, patch_correct, patch_cross_entropy,
                                              patch_probabilities)

    model = build_model("resnet18_layer1", seed=0).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([REAL, REAL, FAKE, FAKE])
    with torch.no_grad():
        logits = model(x).float()
    assert logits.shape[:2] == (4, NUM_CLASSES)

    probs, predicted_labels = predict(model, [(x, labels, torch.arange(4))], torch.device("cpu"),
                                      memory_format=torch.contiguous_format)
    assert torch.equal(predicted_labels, labels)
    torch.testing.assert_close(probs, p_fake(logits))
    torch.testing.assert_close(patch_probabilities(logits), p_fake(logits))
    # by hand: softmax of the two channels, fake second
    by_hand = logits[:, 1].exp() / (logits[:, 0].exp() + logits[:, 1].exp())
    torch.testing.assert_close(p_fake(logits), by_hand)
    torch.testing.assert_close(image_scores(logits), p_fake(logits).mean(dim=(1, 2)))
    torch.testing.assert_close(image_scores(logits, "vote"), fake_wins(logits).float().mean(dim=(1, 2)))

    # the patch loss is the mean of -log P(true class) over every patch
    p = p_fake(logits.double())
    truth = torch.where(labels[:, None, None] == FAKE, p, 1 - p)
    torch.testing.assert_close(patch_cross_entropy(logits, labels).double(), -truth.log().mean(),
                               rtol=1e-5, atol=1e-6)
    correct, total = patch_correct(logits, labels)
    assert total == p.numel()
    assert correct == int((fake_wins(logits) == (labels[:, None, None] == FAKE)).sum())

    # metrics treat FAKE as the positive class: flipping every label mirrors the fake accuracy onto the reals
    scores = image_scores(logits)
    metrics = compute_metrics(scores, labels)
    assert metrics["n_fake"] == 2 and metrics["n_real"] == 2
    expected_fake_acc = float(np.mean(scores[labels == FAKE].numpy() > 0.5))
    assert metrics["acc_fake"] == pytest.approx(expected_fake_acc)
