"""Scoring a classifier at other load/crop sizes than it was trained at is allowed, but said in one warning
line naming both sizes: in eval, patches and exaggerate's classifier input; never when the sizes agree."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.analysis.patches import PatchesConfig, score_images
from patchscope.analysis.shift_grid import ExaggerateConfig, run_exaggerate
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig, evaluate, warn_size_mismatch
from patchscope.forensics.models import build_model
from patchscope.generators.pgan.zoo import save_pgan_zoo
from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

TRAINED = "classifier trained at load size 32, crop size 32 but scored at"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sizes")
    save_classifier(root / "run" / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    rng = np.random.RandomState(0)
    for kind in ("real", "fake"):
        (root / kind / "test").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / kind / "test" / f"{i}.png")
    return {"run": root / "run", "real": root / "real", "fake": root / "fake", "root": root}


def _size_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("classifier trained at")]


@pytest.mark.parametrize("sizes, expected", [({}, None), ({"load_size": 32, "crop_size": 32}, None),
                                             ({"load_size": 40, "crop_size": 36}, "load size 40, crop size 36"),
                                             ({"crop_size": 24}, "load size 32, crop size 24")])
def test_eval_warns_when_the_sizes_differ_from_the_trained_ones(world, sizes, expected, tmp_path, caplog) -> None:
    config = EvalConfig(run=str(world["run"]), tests=[f"t={world['real']},{world['fake']}"], out=str(tmp_path / "e"),
                        device="cpu", precision="fp32", **sizes)
    with caplog.at_level(logging.WARNING, logger="patchscope.eval"):
        summary = evaluate(config)
    found = _size_warnings(caplog)
    if expected is None:
        assert found == [] and summary["load_size"] == 32
    else:
        assert len(found) == 1 and "\n" not in found[0]
        assert found[0].startswith(f"{TRAINED} {expected} (--load-size/--crop-size)")


@pytest.mark.parametrize("sizes, warned", [({}, False), ({"load_size": 40}, True)])
def test_patches_warns_when_the_sizes_differ(world, sizes, warned, caplog) -> None:
    config = PatchesConfig(run=str(world["run"]), real=str(world["real"]), fake=str(world["fake"]), device="cpu",
                           precision="fp32", **sizes)
    with caplog.at_level(logging.WARNING, logger="patchscope.patches"):
        score_images(config, torch.device("cpu"))
    found = _size_warnings(caplog)
    assert len(found) == warned
    if warned:
        assert found[0].startswith(f"{TRAINED} load size 40, crop size 32")


@pytest.mark.parametrize("sizes, warned", [({}, False), ({"crop_size": RESOLUTION - 2}, True)])
def test_exaggerate_warns_when_its_classifier_input_differs(sizes, warned, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    save_classifier(tmp_path / "classifier" / "best", brightness_classifier(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    config = ExaggerateConfig(generator=str(tmp_path / "pgan.pt"), classifier=str(tmp_path / "classifier"),
                              out=str(tmp_path / "out"), lam=0.0, steps=2, batch_size=4, eval_n=4, grid_rows=0,
                              device="cpu", precision="fp32", **sizes)
    with caplog.at_level(logging.WARNING, logger="patchscope.exaggerate"):
        run_exaggerate(config)
    found = _size_warnings(caplog)
    assert len(found) == warned
    if warned:
        assert found[0].startswith(f"classifier trained at load size {RESOLUTION}, crop size {RESOLUTION} but "
                                   f"scored at load size {RESOLUTION}, crop size {RESOLUTION - 2}")


def test_sizes_that_were_never_recorded_are_not_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert not warn_size_mismatch({}, 64, 64)
        assert not warn_size_mismatch(None, 64, 64)
        assert warn_size_mismatch({"load_size": None, "crop_size": None}, 64, 64)
    assert _size_warnings(caplog) == ["classifier trained at load size none, crop size none but scored at load "
                                      "size 64, crop size 64 (--load-size/--crop-size): its patches see the images "
                                      "at another scale, so scores may not match its accuracy at its own size"]


@pytest.mark.parametrize("sizes, warned", [({}, False), ({"load_size": 44, "crop_size": 40}, True)])
def test_score_warns_when_the_sizes_differ(world, sizes, warned, caplog) -> None:
    from patchscope.forensics.score_images import ScoreConfig, score_images as score_unlabelled

    config = ScoreConfig(run=str(world["run"]), inputs=[str(world["real"])], device="cpu", precision="fp32", **sizes)
    with caplog.at_level(logging.WARNING, logger="patchscope.score"):
        score_unlabelled(config)
    found = _size_warnings(caplog)
    assert len(found) == int(warned)
    if warned:
        assert "scored at load size 44, crop size 40" in found[0]
