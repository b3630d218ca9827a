"""The report's jargon, explained once: a tooltip on table headers that use a term, and a visible "Terms" line
under the sections that use it (tooltips do not print, and touch screens do not show them).
"""
from __future__ import annotations

import html

TERMS: dict[str, str] = {
    "AP": "average precision of the image scores, fake as the positive class (area under the precision-recall curve)",
    "AP (real+)": "average precision with real as the positive class, the public code's convention",
    "ROC AUC": "area under the ROC curve: the chance a random fake scores above a random real",
    "acc": "accuracy at P(fake) = 0.5 on reals and fakes together",
    "acc real": "share of real images called real (P(fake) < 0.5)",
    "acc fake": "share of fake images called fake (P(fake) >= 0.5)",
    "patch AP": "AP of single patch predictions, every output cell of every image counted",
    "patch acc": "accuracy of single patch predictions",
    "after_softmax": "image score = mean P(fake) of its patches (the paper's)",
    "before_softmax": "image score = softmax of the mean patch logits",
    "vote": "image score = share of patches voting fake",
    "most predictive": "per image, the one patch (output cell) most sure of the image's true class; the n surest "
                       "images are kept",
    "random": "one patch per kept image drawn uniformly among its positions: the shares a class or place would get "
              "by chance; \"N random\" counts these baseline patches",
    "border": "a patch whose centre lies within the band (one receptive field, at most a quarter of the image side) "
              "of an image edge",
    "corner": "a patch whose centre lies within the band of two edges (a horizontal and a vertical one)",
    "expected from area": "the share if the patch were any output position alike: border (corner) positions "
                          "over all positions",
    "k": "step along the learned latent shift w: samples G(z - k*w); k > 0 more fake, k = 0 the original",
    "LPIPS": "learned perceptual distance between two images (0: identical)",
    "lambda (LPIPS weight)": "weight of the LPIPS term that keeps shifted samples close to the originals",
    "P(fake)": "the classifier's probability that an image (or patch) is fake",
    "n": "number of images (or patches) measured",
}


def tip(term: str) -> str:
    """The definition of a term as an HTML attribute (` title="..."`), or nothing for a plain word."""
    definition = TERMS.get(term)
    return f' title="{html.escape(definition, quote=True)}"' if definition else ""


def terms_note(*terms: str) -> str:
    """One visible line defining the given terms, in the order given; unknown terms are left out."""
    known = [t for t in dict.fromkeys(terms) if t in TERMS]
    if not known:
        return ""
    items = "; ".join(f"<b>{html.escape(t)}</b>: {html.escape(TERMS[t])}" for t in known)
    return f'<p class="terms">Terms: {items}.</p>'
