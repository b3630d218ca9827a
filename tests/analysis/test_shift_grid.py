"""The exaggeration grid (rows of G(z − k·w) captioned with P(fake), k = 0 framed) and the
`run_exaggerate` study: its files, resume, force and refusals."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.analysis.grids import BACKGROUND, GAP, HIGHLIGHT, grid_layout, to_uint8
from patchscope.analysis.shift_grid import ExaggerateConfig, render_shift_grid, run_exaggerate, shift_grid, shift_grid_content
from patchscope.attacks.shift import SIGN_CONVENTION, ShiftExaggeration, load_shift, step_seed
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.generators import checkpoint_sha256
from patchscope.generators.pgan.zoo import save_pgan_zoo
from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

KS = (-2.0, -1.0, 0.0, 1.0, 2.0)



@pytest.fixture(scope="module")
def sweep():
    generator, classifier = tiny_pgan()[0], brightness_classifier()
    attack = ShiftExaggeration(generator, classifier, None, lam=0.0, precision="fp32")
    shift = torch.linspace(-1, 1, generator.latent_dim)
    return attack.sweep(shift, KS, n=3, seed=5, keep_images=True)


def test_grid_content_is_a_row_per_sample_and_a_column_per_k_captioned_with_p_fake(sweep) -> None:
    content = shift_grid_content(sweep, "z", seed=5)
    assert len(content["images"]) == 3 and all(len(row) == 5 for row in content["images"])
    np.testing.assert_array_equal(content["images"][1][4], to_uint8(sweep.images[1, 4]))
    assert content["captions"][2][0] == f"P(fake) {float(sweep.p_fake[2, 0]):.3f}"
    assert content["col_labels"] == ["k=-2", "k=-1", "k=0 original", "k=+1", "k=+2"]
    assert content["row_labels"][1] == "seed 5\n#1"
    assert content["highlight_col"] == 2
    assert "G(z - k·w)" in content["title"] and "k > 0 more fake" in content["title"]


def test_grid_image_has_the_layout_tiles_and_frame_of_its_content(sweep) -> None:
    image = render_shift_grid(sweep, "z", seed=5)
    content = shift_grid_content(sweep, "z", seed=5)
    tile = 8 * RESOLUTION  # 16 px samples are enlarged by a whole factor to 128 px
    layout = grid_layout(3, 5, tile, tile, content["row_labels"], content["col_labels"], content["captions"],
                         content["title"])
    assert image.size == (layout.width, layout.height)
    pixels = np.asarray(image)
    x, y = layout.tile_origin(1, 3)
    enlarged = np.repeat(np.repeat(content["images"][1][3], 8, axis=0), 8, axis=1)
    np.testing.assert_array_equal(pixels[y:y + tile, x:x + tile], enlarged)
    for col, colour in ((2, HIGHLIGHT), (1, BACKGROUND)):  # only the original (k = 0) is framed
        x, y = layout.tile_origin(0, col)
        assert tuple(pixels[y + tile // 2, x - GAP + 1]) == colour


def test_shift_grid_shows_the_plain_samples_of_the_seed_in_the_original_column() -> None:
    generator, classifier = tiny_pgan()[0], brightness_classifier()
    shift = torch.linspace(-1, 1, generator.latent_dim)
    image = np.asarray(shift_grid(generator, classifier, shift, ks=(-1, 0, 1), n_rows=2, seed=3, precision="fp32"))
    with torch.no_grad():
        plain = to_uint8(generator(generator.sample_latents(2, seed=3)).clamp(-1, 1))
    tile = 8 * RESOLUTION
    content = shift_grid_content(ShiftExaggeration(generator, classifier, None, lam=0.0, precision="fp32").sweep(
        shift, (-1, 0, 1), n=2, seed=3, keep_images=True), "z", seed=3)
    layout = grid_layout(2, 3, tile, tile, content["row_labels"], content["col_labels"], content["captions"],
                         content["title"])
    for row in range(2):
        x, y = layout.tile_origin(row, 1)
        np.testing.assert_array_equal(image[y:y + tile, x:x + tile],
                                      np.repeat(np.repeat(plain[row], 8, axis=0), 8, axis=1))
        x, y = layout.tile_origin(row, 2)
        assert not np.array_equal(image[y:y + tile, x:x + tile][::8, ::8], plain[row])  # k = 1 moved it


# ----------------------------------------------------------------------------- the study

@pytest.fixture()
def case(tmp_path: Path) -> dict:
    """A saved tiny PGAN and a saved brightness classifier trained (so its metadata says) at 16 px."""
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    save_classifier(tmp_path / "classifier" / "best", brightness_classifier(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    return {"generator": tmp_path / "pgan.pt", "classifier": tmp_path / "classifier", "out": tmp_path / "out"}


def _config(case: dict, **overrides) -> ExaggerateConfig:
    settings = dict(generator=str(case["generator"]), classifier=str(case["classifier"]), out=str(case["out"]),
                    steps=40, batch_size=8, lr=0.02, eval_n=16, grid_rows=2, lpips_random=True, device="cpu",
                    precision="fp32")
    return ExaggerateConfig(**{**settings, **overrides})


def test_study_writes_shift_metrics_log_grid_and_config(case) -> None:
    summary = run_exaggerate(_config(case))
    out = case["out"]
    assert summary["fitted"] and summary["space"] == "z" and summary["eval_seed"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == summary["rows"] and metrics["sign_convention"] == SIGN_CONVENTION
    p_fake = [row["p_fake"] for row in metrics["rows"]]
    assert [row["k"] for row in metrics["rows"]] == list(KS) and p_fake == sorted(p_fake), p_fake
    assert metrics["rows"][2]["lpips"] == 0
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [float(row["p_fake"]) for row in table] == pytest.approx(p_fake, rel=1e-12)
    assert list(table[0]) == ["k", "n", "p_fake", "p_fake_std", "logit", "logit_std", "lpips", "lpips_std"]

    shift, meta = load_shift(out)
    assert torch.equal(torch.load(out / "shift.pt", weights_only=True)["shift"], shift)
    assert meta["generator_sha256"] == checkpoint_sha256(case["generator"])
    assert meta["classifier"].endswith("best.safetensors") and meta["load_size"] == RESOLUTION
    assert meta["space"] == "z" and meta["lam"] == 1.0 and meta["steps"] == 40 and meta["k_metrics"] == metrics["rows"]
    assert meta["lpips"] == "alex: random"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 40
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 5 * 8 * RESOLUTION and grid.size[1] > 2 * 8 * RESOLUTION
    assert (out / "config.yaml").is_file()


def test_existing_study_is_refused_resumed_for_rescoring_or_fitted_again(case, monkeypatch) -> None:
    first = run_exaggerate(_config(case, steps=5))
    with pytest.raises(InputError, match="already holds an exaggeration; pass --resume"):
        run_exaggerate(_config(case, steps=5))
    with pytest.raises(InputError, match=r"cannot resume with different lam \(saved: lam=1\.0\)"):
        run_exaggerate(_config(case, steps=5, lam=2.0), resume=True)

    fits: list[int] = []
    real_fit = ShiftExaggeration.fit
    monkeypatch.setattr(ShiftExaggeration, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))
    again = run_exaggerate(_config(case, steps=5, ks=[0.0, 3.0]), resume=True)  # re-scored, not refitted
    assert fits == [] and not again["fitted"] and [row["k"] for row in again["rows"]] == [0.0, 3.0]
    assert again["shift_norm"] == first["shift_norm"]
    assert load_shift(case["out"])[1]["k_metrics"] == again["rows"]

    (case["out"] / "shift.json").unlink()  # as if the fit had been interrupted
    assert run_exaggerate(_config(case, steps=5), resume=True)["fitted"] and fits == [1]
    refit = run_exaggerate(_config(case, steps=5, lam=2.0), force=True)
    assert refit["fitted"] and fits == [1, 1] and load_shift(case["out"])[1]["lam"] == 2.0


def test_resume_with_another_generator_file_is_refused(case) -> None:
    run_exaggerate(_config(case, steps=2))
    generator, discriminator = tiny_pgan(seed=1)
    save_pgan_zoo(generator, case["generator"], discriminator=discriminator)
    with pytest.raises(InputError, match="another generator file"):
        run_exaggerate(_config(case, steps=2), resume=True)


def test_user_mistakes_are_one_line_errors(case) -> None:
    with pytest.raises(InputError, match="no --classifier given"):
        run_exaggerate(_config(case, classifier=""))
    with pytest.raises(InputError, match="--eval-seed: evaluation seed .* training batch seeds"):
        run_exaggerate(_config(case, steps=5, eval_seed=step_seed(0, 2)))
    with pytest.raises(InputError, match="--space w: .*needs a style generator"):
        run_exaggerate(_config(case, space="w"))
    case["out"].mkdir()
    (case["out"] / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an exaggeration folder"):
        run_exaggerate(_config(case), force=True)
