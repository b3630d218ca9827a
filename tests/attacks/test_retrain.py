"""Retraining on a finetuned generator: the finetuned fakes copy the original set's sampling, a new classifier
trains on them with the old settings, both are scored on both fake sets; stages are cached, force redoes them."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from patchscope.attacks.retrain import RetrainConfig, plan_sampling, retrain
import patchscope.attacks.retrain as retrain_module
from patchscope.common.config import read_yaml
from patchscope.common.errors import CheckpointError
from patchscope.common.errors import InputError
from patchscope.forensics.builtin_images import builtin_photos, random_crops
from patchscope.forensics.checkpoint import load_classifier
from patchscope.forensics.train import TrainConfig, fit
from patchscope.generators.sampling import SampleConfig, sample_dataset
from tests.tiny_models import save_tiny_pgan

RESOLUTION = 16  # generator output; the fake sets are Lanczos-resized to SIZE, as a working size would be
SIZE = 32
COUNTS = {"train": 32, "val": 16, "test": 16}
SAMPLE_SEED, CHUNK = 3, 4  # not sample_dataset's defaults, so copying them from the manifest is visible



def write_reals(folder: Path, counts: dict[str, int]) -> Path:
    photos = builtin_photos()
    for offset, (split, n) in enumerate(counts.items()):
        (folder / split).mkdir(parents=True)
        for i, crop in enumerate(random_crops(photos, n, SIZE, seed=100 + offset)):
            Image.fromarray(crop).save(folder / split / f"{i:05d}.png")
    return folder


def make_world(root: Path) -> dict[str, Path]:
    """An original and a "finetuned" tiny PGAN, the original's fake set, reals, and a classifier trained on them."""
    world = {"original_generator": save_tiny_pgan(root / "original.pt", seed=0),
             "finetuned_generator": save_tiny_pgan(root / "finetuned.pt", seed=1),
             "reals": write_reals(root / "reals", COUNTS), "original_fakes": root / "original_fakes",
             "base": root / "base"}
    sample_dataset(SampleConfig(generator=str(world["original_generator"]), out=str(world["original_fakes"]),
                                counts=COUNTS, seed=SAMPLE_SEED, size=SIZE, chunk=CHUNK), progress=False)
    fit(TrainConfig(real=str(world["reals"]), fake=str(world["original_fakes"]), out=str(world["base"]),
                    model="xception_block1", load_size=SIZE, crop_size=SIZE, init="kaiming", batch_size=16,
                    max_epochs=3, seed=0, device="cpu", precision="fp32", eval_batch_size=32))
    return world


def run_retrain(world: dict[str, Path], out: Path, resume: bool = True, force: bool = False, **settings: Any):
    config = RetrainConfig(classifier=str(world["base"]), generator=str(world["finetuned_generator"]), out=str(out),
                           **{"device": "cpu", "precision": "fp32", **settings})
    return retrain(config, resume=resume, force=force, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("retrain_world"))


@pytest.fixture(scope="module")
def retrained(world, tmp_path_factory):
    return run_retrain(world, tmp_path_factory.mktemp("retrain") / "out")


# ----------------------------------------------------------------------------- what it computes

def test_both_classifiers_are_scored_on_both_fake_sets_with_the_same_reals(retrained) -> None:
    assert set(retrained.metrics) == {"old", "new"}
    for who in ("old", "new"):
        assert set(retrained.metrics[who]) == {"original", "finetuned"}
        for name, m in retrained.metrics[who].items():
            assert m["n"] == 2 * COUNTS["test"], (who, name)
            for key in ("ap", "ap_real", "acc", "acc_real", "acc_fake", "roc_auc"):
                assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (who, name, key, m[key])
    # The old classifier learnt the original fakes; the new one learnt the finetuned ones.
    assert retrained.metrics["old"]["original"]["ap"] > 0.9
    assert retrained.metrics["new"]["finetuned"]["ap"] > 0.9
    eval_old = json.loads((retrained.out / "eval" / "old" / "metrics.json").read_text())
    assert eval_old["results"]["finetuned"]["after_softmax"]["acc"] == retrained.metrics["old"]["finetuned"]["acc"]


def test_the_new_classifier_has_the_old_settings_but_trains_on_the_finetuned_fakes(world, retrained) -> None:
    _, old_meta = load_classifier(world["base"])
    _, new_meta = load_classifier(retrained.classifier)
    old, new = old_meta["config"], new_meta["config"]
    assert new["fake"] == str(retrained.out / "fakes") and new["real"] == str(world["reals"])
    assert new["out"] == str(retrained.out / "classifier")
    assert {k: v for k, v in new.items() if k not in ("fake", "out")} == {k: v for k, v in old.items()
                                                                          if k not in ("fake", "out")}
    assert retrained.train["finished"] and retrained.train["epochs"] == 3


def test_finetuned_fakes_copy_the_original_sets_sampling_settings(world, retrained) -> None:
    original = json.loads((world["original_fakes"] / "manifest.json").read_text())
    sampled = json.loads((retrained.out / "fakes" / "manifest.json").read_text())
    for key in ("size", "options", "seed", "split_seeds", "chunk", "precision", "counts"):
        assert sampled[key] == original[key], key
    assert (sampled["seed"], sampled["chunk"], sampled["size"]) == (SAMPLE_SEED, CHUNK, SIZE)
    assert sampled["generator_sha256"] != original["generator_sha256"]
    assert sampled["weights_sha256"] != original["weights_sha256"]
    assert Image.open(retrained.out / "fakes" / "test" / "000015.png").size == (SIZE, SIZE)
    assert not (retrained.out / "fakes" / "test" / "000016.png").exists()


def test_the_table_is_written_as_json_and_csv(retrained) -> None:
    table = json.loads((retrained.out / "metrics.json").read_text())
    assert table["metrics"] == retrained.metrics
    with open(retrained.out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["classifier"], r["test_set"]) for r in rows] == [
        ("old", "original"), ("old", "finetuned"), ("new", "original"), ("new", "finetuned")]
    assert float(rows[3]["ap"]) == pytest.approx(retrained.metrics["new"]["finetuned"]["ap"])


# ----------------------------------------------------------------------------- caching

def test_rerunning_reuses_every_stage_and_leaves_the_new_checkpoint_untouched(world, retrained) -> None:
    weights = retrained.classifier / "best.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    again = run_retrain(world, retrained.out)
    assert again.stages == {"sample": "reused", "train": "reused", "eval_old": "reused", "eval_new": "reused"}
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert again.metrics == retrained.metrics


def test_force_redoes_every_stage(world, retrained, tmp_path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(retrained.out, out)
    (out / "classifier" / "stray.txt").write_text("left by the run being redone")
    weights = out / "classifier" / "best.safetensors"
    before = weights.stat().st_mtime_ns
    redone = run_retrain(world, out, force=True)
    assert redone.stages == {"sample": "ran", "train": "ran", "eval_old": "ran", "eval_new": "ran"}
    assert not (out / "classifier" / "stray.txt").exists() and weights.stat().st_mtime_ns != before
    assert redone.metrics["old"] == retrained.metrics["old"]
    for name, m in redone.metrics["new"].items():  # same seed, same data: the same classifier again
        assert m["ap"] == pytest.approx(retrained.metrics["new"][name]["ap"], abs=1e-6)


def test_an_interrupted_training_continues_from_its_last_epoch(world, tmp_path, monkeypatch) -> None:
    def fit_stopped_after_epoch_1(config, resume=False):
        def stop(record):
            if record["epoch"] == 1:
                raise KeyboardInterrupt
        return fit(config, resume=resume, on_epoch_end=stop)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(retrain_module, "fit", fit_stopped_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_retrain(world, out)
    monkeypatch.undo()
    assert not (out / "eval").exists()
    resumed = run_retrain(world, out)
    assert resumed.stages == {"sample": "reused", "train": "ran", "eval_old": "ran", "eval_new": "ran"}
    log = [json.loads(line) for line in (out / "classifier" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and resumed.train["epochs"] == 3


# ----------------------------------------------------------------------------- the sampling plan

def test_without_a_manifest_the_classifiers_input_size_and_the_split_sizes_are_used(world, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(world["original_fakes"], bare, ignore=shutil.ignore_patterns("manifest.json"))
    config = TrainConfig(load_size=24, crop_size=20)
    plan = plan_sampling(bare, config)
    assert (plan.size, plan.counts, plan.seed, plan.options) == (24, COUNTS, 0, {})
    assert "no manifest.json" in plan.source
    given = plan_sampling(bare, config, counts={"train": 4}, seed=9)
    assert (given.counts, given.seed) == ({"train": 4, "val": 16, "test": 16}, 9)
    from_manifest = plan_sampling(world["original_fakes"], config, counts={"test": 2})
    assert (from_manifest.size, from_manifest.seed, from_manifest.chunk) == (SIZE, SAMPLE_SEED, CHUNK)
    assert from_manifest.counts == {"train": 32, "val": 16, "test": 2}


def test_counts_leaving_a_needed_split_empty_are_refused(world) -> None:
    with pytest.raises(InputError, match=r"needs finetuned fakes in val$"):
        plan_sampling(world["original_fakes"], TrainConfig(), counts={"val": 0})


# ----------------------------------------------------------------------------- refusals

def test_a_missing_base_run_is_one_clear_error(world, tmp_path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(InputError, match=r"no_such_run.*no classifier checkpoint here"):
        retrain(RetrainConfig(classifier=str(missing), generator=str(world["finetuned_generator"]),
                              original_fakes=str(world["original_fakes"]), real=str(world["reals"]),
                              out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_generator_is_refused_before_anything_is_written(world, tmp_path) -> None:
    bogus = tmp_path / "weights.pt"
    torch.save({"state": torch.zeros(3)}, bogus)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a generator checkpoint"):
        retrain(RetrainConfig(classifier=str(world["base"]), generator=str(bogus), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_settings_or_without_resume_is_refused(world, retrained) -> None:
    with pytest.raises(InputError, match=r"cannot resume with different sampling.*force"):
        run_retrain(world, retrained.out, counts={"train": 8, "val": 4, "test": 4})
    with pytest.raises(InputError, match=r"already holds a retrain"):
        run_retrain(world, retrained.out, resume=False)
    assert read_yaml(retrained.out / "config.yaml")["sampling"]["counts"] == COUNTS


def test_a_folder_holding_other_files_is_refused(world, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not a retrain folder"):
        run_retrain(world, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_finetuned_generator_of_another_architecture_samples_with_its_own_defaults(world, tmp_path) -> None:
    """The original set's forward options (PGAN's alpha) do not apply to a StyleGAN2: they are dropped, not
    passed on to fail; the other sampling settings still carry over."""
    from patchscope.generators.stylegan2.model import StyleGAN2Config, StyleGAN2Generator

    assert plan_sampling(world["original_fakes"], TrainConfig()).made_by == "PGANZooGenerator"
    torch.manual_seed(0)
    generator = StyleGAN2Generator(StyleGAN2Config(size=RESOLUTION, style_dim=16, n_mlp=2, channels=(16, 16, 16)))
    config = RetrainConfig(classifier=str(world["base"]), out=str(tmp_path / "out"), device="cpu", precision="fp32",
                           train={"max_epochs": 1})
    result = retrain(config, generator, progress=False)
    sampled = json.loads((result.out / "fakes" / "manifest.json").read_text())
    assert "alpha" not in sampled["options"]  # the StyleGAN2's own defaults (psi, noise_mode) instead
    assert (sampled["seed"], sampled["chunk"], sampled["size"]) == (SAMPLE_SEED, CHUNK, SIZE)
    assert sampled["generator"]["class"] == "StyleGAN2Generator"
