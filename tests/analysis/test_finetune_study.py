"""The finetuning study (`run_finetune`): a finetuned generator file `load_generator` reads, the log, the
original-vs-finetuned grid and before/after table, and resume, force and refusals."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from patchscope.analysis.finetune_study import GRID_TITLE, FinetuneConfig, finetune_grid_content, run_finetune
from patchscope.analysis.grids import grid_layout, to_uint8
from patchscope.attacks.finetune import GeneratorFinetuner
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.generators import checkpoint_sha256, load_generator
from patchscope.generators.pgan.zoo import save_pgan_zoo
from tests.attacks.test_finetune import detector
from tests.attacks.test_shift import RESOLUTION, tiny_pgan

GRID_ROWS = 3



@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Real 16 px crops as PNGs in train/ and val/, a saved tiny PGAN with its critic, a saved detector."""
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    root = tmp_path_factory.mktemp("finetune")
    for split, seed in (("train", 0), ("val", 1)):
        (root / "real" / split).mkdir(parents=True)
        for i, crop in enumerate(random_crops(builtin_photos(), 32, RESOLUTION, seed=seed)):
            Image.fromarray(crop).save(root / "real" / split / f"{i:03d}.png")
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, root / "pgan.pt", discriminator=discriminator)
    save_classifier(root / "classifier" / "best", detector(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    return {"generator": root / "pgan.pt", "classifier": root / "classifier", "real": root / "real", "root": root}


def make_config(sources: dict[str, Path], out: Path, **overrides) -> FinetuneConfig:
    settings = dict(generator=str(sources["generator"]), classifier=str(sources["classifier"]),
                    real=str(sources["real"]), out=str(out), steps=6, batch_size=8, classifier_weight=10.0,
                    ema_beta=0.5, checkpoint_every=3, log_every=3, eval_n=16, compare_n=32, grid_rows=GRID_ROWS,
                    lpips_random=True, device="cpu", precision="fp32")
    return FinetuneConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def study(sources) -> tuple[dict, Path]:
    out = sources["root"] / "study"
    return run_finetune(make_config(sources, out)), out


def test_the_finetuned_generator_is_written_in_the_source_format(study, sources) -> None:
    summary, out = study
    assert summary["generator"] == str(out / "generator.pt") and summary["format"] == "pgan_zoo"
    assert summary["steps"] == 6 and summary["stopped"] is None
    finetuned, original = load_generator(out / "generator.pt"), load_generator(sources["generator"])
    assert finetuned.format == "pgan_zoo" and finetuned.discriminator is not None
    z = original.sample_latents(4, seed=5)
    with torch.no_grad():
        assert not torch.allclose(finetuned(z), original(z))
    assert (out / "config.yaml").is_file() and (out / "resume.pt").is_file()


def test_the_log_has_losses_and_the_classifier_on_fresh_samples_every_interval(study) -> None:
    _, out = study
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 3, 6]
    assert "loss_d" not in records[0] and {"acc", "acc_fake", "ap", "p_fake", "lpips"} <= set(records[0])
    assert records[0]["lpips"] == 0  # step 0 is the original generator itself
    for record in records[1:]:
        assert {"loss_d", "gradient_penalty", "drift", "loss_g_gan", "loss_classifier", "lpips", "ap"} <= set(record)
    assert records[2]["acc_fake"] < records[0]["acc_fake"] and records[2]["lpips"] > 0


def test_before_after_table_shows_the_classifier_fooled_on_held_out_latents(study, sources) -> None:
    summary, out = study
    table = json.loads((out / "before_after.json").read_text())
    before, after = table["rows"]
    assert (before["generator"], after["generator"]) == ("original", "finetuned")
    assert before["n_fake"] == after["n_fake"] == 32 and table["eval_seed"] == 1 and table["n_real"] == 32
    assert after["acc_fake"] < before["acc_fake"] - 0.3 and after["p_fake"] < before["p_fake"]
    assert table["change"]["acc_fake"] == pytest.approx(after["acc_fake"] - before["acc_fake"])
    assert before["lpips_to_original"] == 0 and after["lpips_to_original"] > 0
    assert table["generator_sha256"] == checkpoint_sha256(sources["generator"])
    assert table["finetuned_sha256"] == checkpoint_sha256(out / "generator.pt")
    assert table["settings"]["objective"] == "wgan-gp" and table["settings"]["lr"] == 1e-3
    with open(out / "before_after.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["generator"] for row in rows] == ["original", "finetuned"]
    assert float(rows[1]["acc_fake"]) == after["acc_fake"] and float(rows[0]["ap"]) == pytest.approx(before["ap"])
    assert summary["rows"] == table["rows"]


def test_the_grid_shows_original_and_finetuned_samples_of_the_same_latents(study, sources) -> None:
    _, out = study
    original, finetuned = load_generator(sources["generator"]), load_generator(out / "generator.pt")
    z = original.sample_latents(GRID_ROWS, seed=1)
    with torch.no_grad():
        columns = [to_uint8(g(z).clamp(-1, 1)) for g in (original, finetuned)]
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    tile = 8 * RESOLUTION  # 16 px samples are enlarged by a whole factor to 128 px
    for row in range(GRID_ROWS):
        for col in range(2):
            x, y = first_tile_corner(grid, row, col, tile)
            np.testing.assert_array_equal(grid[y:y + tile, x:x + tile],
                                          np.repeat(np.repeat(columns[col][row], 8, axis=0), 8, axis=1))


def first_tile_corner(grid: np.ndarray, row: int, col: int, tile: int) -> tuple[int, int]:
    """Where `grid_layout` puts tile (row, col) for this study's labels and captions."""
    labels = {"row_labels": [f"seed 1\n#{i}" for i in range(GRID_ROWS)],
              "col_labels": ["original", "finetuned"],
              "captions": [["P(fake) 0.000"] * 2] * GRID_ROWS,
              "title": GRID_TITLE.format(steps=6)}
    layout = grid_layout(GRID_ROWS, 2, tile, tile, **labels)
    assert grid.shape[:2] == (layout.height, layout.width)
    return layout.tile_origin(row, col)


def test_grid_content_captions_every_tile_with_p_fake(sources) -> None:
    generator = load_generator(sources["generator"])
    real = torch.zeros(4, 3, RESOLUTION, RESOLUTION, dtype=torch.uint8)
    attack = GeneratorFinetuner(generator, detector(), real)
    comparison = attack.compare(5, seed=7, keep_images=2)
    content = finetune_grid_content(comparison, steps=0)
    assert len(content["images"]) == 2 and content["highlight_col"] == 0 and "(0 steps)" in content["title"]
    assert content["captions"][1][0] == f"P(fake) {float(comparison.p_fake['original'][1]):.3f}"
    assert content["row_labels"] == ["seed 7\n#0", "seed 7\n#1"]
    np.testing.assert_array_equal(content["images"][0][1], to_uint8(comparison.images["finetuned"][0]))


def test_rerun_is_refused_resume_rescores_or_continues_and_force_restarts(sources, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_finetune(make_config(sources, out, steps=3, log_every=0, grid_rows=0))
    with pytest.raises(InputError, match="already holds a finetuning run; pass --resume"):
        run_finetune(make_config(sources, out, steps=3, log_every=0, grid_rows=0))
    with pytest.raises(InputError, match=r"different classifier_weight \(saved: classifier_weight=10\.0\)"):
        run_finetune(make_config(sources, out, steps=3, log_every=0, grid_rows=0, classifier_weight=1.0), resume=True)
    again = run_finetune(make_config(sources, out, steps=3, log_every=0, grid_rows=0, compare_n=8), resume=True)
    assert again["steps"] == 3 and checkpoint_sha256(out / "generator.pt") == json.loads(
        (out / "before_after.json").read_text())["finetuned_sha256"]
    assert again["rows"][0]["n_fake"] == 8 and first["rows"][0]["n_fake"] == 32
    longer = run_finetune(make_config(sources, out, steps=5, log_every=0, grid_rows=0), resume=True)
    assert longer["steps"] == 5 and torch.load(out / "resume.pt", weights_only=True)["step"] == 5
    restarted = run_finetune(make_config(sources, out, steps=2, log_every=0, grid_rows=0), force=True)
    assert restarted["steps"] == 2 and not (out / "grid.png").exists()


def test_a_folder_killed_before_its_config_is_taken_by_force_only(sources, tmp_path: Path) -> None:
    """Killed after sources.json but before config.yaml: a plain rerun and --resume say what happened;
    --force starts over (a leftover temporary file of the crashed write does not get in the way)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "sources.json").write_text('{"generator_sha256": "0"}')
    (out / ".config.yaml.x1y2.tmp").write_text("half")
    for resume in (False, True):
        with pytest.raises(InputError, match=r"cut short before its config\.yaml \(sources\.json\); pass --force"):
            run_finetune(make_config(sources, out, steps=1, log_every=0, grid_rows=0), resume=resume)
    result = run_finetune(make_config(sources, out, steps=1, log_every=0, grid_rows=0, compare_n=4), force=True)
    assert result["steps"] == 1 and (out / "config.yaml").is_file() and not (out / ".config.yaml.x1y2.tmp").exists()


def test_resume_from_another_generator_file_is_refused(sources, tmp_path: Path) -> None:
    generator, discriminator = tiny_pgan(seed=1)
    save_pgan_zoo(generator, tmp_path / "other.pt", discriminator=discriminator)
    run_finetune(make_config(sources, tmp_path / "run", generator=str(tmp_path / "other.pt"), steps=1, log_every=0,
                             grid_rows=0, compare_n=4))
    save_pgan_zoo(tiny_pgan(seed=2)[0], tmp_path / "other.pt", discriminator=discriminator)
    with pytest.raises(InputError, match="finetuned from another generator file"):
        run_finetune(make_config(sources, tmp_path / "run", generator=str(tmp_path / "other.pt"), steps=1,
                                 log_every=0, grid_rows=0, compare_n=4), resume=True)


def test_user_mistakes_are_one_line_errors(sources, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no --real given"):
        run_finetune(make_config(sources, tmp_path / "a", real=""))
    with pytest.raises(InputError, match="batch_size=1: expected an integer >= 2"):
        make_config(sources, tmp_path / "a", batch_size=1)
    with pytest.raises(InputError, match=r"ema_beta=1\.0: expected a finite number >= 0 and < 1"):
        make_config(sources, tmp_path / "a", ema_beta=1.0)
    with pytest.raises(InputError, match="lr=0: expected a finite number > 0 or null"):
        make_config(sources, tmp_path / "a", lr=0)
    with pytest.raises(InputError, match=r"no-such-module:make: no such checkpoint file"):
        run_finetune(make_config(sources, tmp_path / "b", generator="no-such-module:make"))
    with pytest.raises(InputError, match=r"pgan\.pt: --weights only apply to a MODULE:CALLABLE generator"):
        run_finetune(make_config(sources, tmp_path / "b", weights="w.safetensors"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a finetuning run folder"):
        run_finetune(make_config(sources, tmp_path / "c"))


def test_a_run_recorded_with_a_numeric_ema_beta_resumes_without_the_option(sources, tmp_path: Path) -> None:
    """Runs saved before ema_beta defaulted to the step rule recorded 0.999: a plain --resume takes their value."""
    out = tmp_path / "run"
    run_finetune(make_config(sources, out, steps=2, log_every=0, grid_rows=0, ema_beta=0.95))
    longer = run_finetune(make_config(sources, out, steps=3, log_every=0, grid_rows=0, ema_beta=None), resume=True)
    assert longer["steps"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["ema_beta"] == 0.95
    with pytest.raises(InputError, match="ema_beta"):  # another explicit value is still a change
        run_finetune(make_config(sources, out, steps=4, log_every=0, grid_rows=0, ema_beta=0.5), resume=True)
