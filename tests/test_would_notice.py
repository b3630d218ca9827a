"""Tests that would notice (issue 21, item 2): each of these changes to the code once passed the whole suite; each
test below fails under the change its docstring names, and passes as the code is.

Sizes are those of the other tests except where the change hides there: load size ≠ crop size, odd crop margins."""
from __future__ import annotations

import contextlib
import csv
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score
from torchvision.transforms.functional import center_crop

from patchscope.analysis.grids import save_image
from patchscope.analysis.patches import write_png as write_patch_png
from patchscope.attacks.finetune import FinetuneSettings, GeneratorFinetuner
from patchscope.attacks.shift import ClassifierInput
from patchscope.common import atomic, runfolder
from patchscope.forensics import epoch_commit
from patchscope.forensics.checkpoint import save_classifier, save_resume_state
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.figures import save_figure
from patchscope.forensics.models import build_model
from patchscope.forensics.scoring import append_csv, plot_pr_curves
from patchscope.forensics.train import TrainConfig, fit
from patchscope.generators.dataset_folder import write_png as write_dataset_png
from patchscope.generators.io.writers import save_generator_checkpoint
from tests.tiny_models import RESOLUTION, tiny_pgan

OLD = b"the previous, complete file"


# ----------------------------------------------------------------------------- writes go through common.atomic

@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory) -> Path:
    """An untrained xception_block1 saved as a run's best checkpoint (32 px, load = crop): its vote and
    after_softmax image scores rank the images differently."""
    run = tmp_path_factory.mktemp("classifier")
    save_classifier(run / "best", build_model("xception_block1", seed=0), {"config": {"load_size": 32, "crop_size": 32}})
    return run


def _evaluation(path: Path, classifier: Path, dataset: Path) -> None:
    """`eval` again into the folder of an earlier one (--force)."""
    evaluate(EvalConfig(run=str(classifier), tests=[f"set={dataset / 'real'},{dataset / 'fake'}"], out=str(path.parent),
                        device="cpu", precision="fp32", force=True))


def _figure(path: Path, *_) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1], [1, 0])
    save_figure(figure, path)


def _old_file(path: Path) -> None:
    path.write_bytes(OLD)


def _epoch_committed(path: Path) -> None:
    epoch_commit.commit(path.parent, 1, {"last.json": b"{}"}, {"epoch": 1})


def _epoch_committed_then_a_later_line(path: Path) -> None:
    _epoch_committed(path)
    epoch_commit.append_line(path, json.dumps({"epoch": 2}))


def _record(path: Path) -> None:
    """A run's settings saved again, by the process holding its folder (a resume)."""
    runfolder.hold(path.parent)
    try:
        runfolder.RunFolder(holds="a run").save(path.parent, {"seed": 1})
    finally:
        runfolder.release(path.parent)


PIXELS = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
# name -> (what is there before, what writes the file anew): checkpoints, the training commit and log, metrics
# tables, eval's results, PNGs of every writer.
WRITES = {
    "best.safetensors": (_old_file, lambda path, *_: save_classifier(path.with_suffix(""),
                                                                     build_model("xception_block1"), {})),
    "resume.pt": (_old_file, lambda path, *_: save_resume_state(path, {"epoch": 1})),
    "generator.pt": (_old_file, lambda path, *_: save_generator_checkpoint(path, tiny_pgan()[0], tiny_pgan()[0],
                                                                           tiny_pgan()[1])),
    "checkpoint.json": (_epoch_committed, lambda path, *_: epoch_commit.commit(path.parent, 2, {"last.json": b"[]"},
                                                                               {"epoch": 2})),
    "metrics.jsonl": (_epoch_committed_then_a_later_line, lambda path, *_: epoch_commit.recover(path.parent)),
    "config.yaml": (_old_file, lambda path, *_: _record(path)),
    "metrics.csv": (lambda path: append_csv(path, [{"run": "old", "ap": 0.25}]),
                    lambda path, *_: append_csv(path, [{"run": "new", "ap": 0.5}])),
    "grid.png": (_old_file, lambda path, *_: save_image(path, Image.fromarray(PIXELS))),
    "patch.png": (_old_file, lambda path, *_: write_patch_png(path, PIXELS)),
    "sample.png": (_old_file, lambda path, *_: write_dataset_png(path, PIXELS)),
    "figure.png": (_old_file, _figure),
    "scores_set.csv": (_old_file, _evaluation),
    "metrics.json": (_old_file, _evaluation),
    "pr_curve.png": (_old_file, _evaluation),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_a_checkpoint_metrics_or_png_write_that_fails_midway_keeps_the_older_file(
        name, tmp_path, monkeypatch, random_classifier, builtin_dataset) -> None:
    """Changes: any of these files written in place (`open(path, "wb")`) instead of through common.atomic, or
    `write_bytes` / `write_text` / `atomic_open` themselves writing in place: the disk filling up halfway through
    the new file then destroys the old one. Here the disk fills up once the new contents are written, before they
    are made the file: the old file must be what is left, and no temporary file beside it."""
    target = tmp_path / "out" / name
    target.parent.mkdir()
    before, write = WRITES[name]
    before(target)
    old = target.read_bytes()
    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def disk_full_at_target(path, mode="w"):
        with real_open(path, mode) as handle:
            yield handle
            if Path(path).name == name:
                handle.flush()
                raise OSError(errno.ENOSPC, f"No space left on device (simulated, {name})")

    monkeypatch.setattr(atomic, "atomic_open", disk_full_at_target)
    with pytest.raises(OSError, match="No space left on device"):
        write(target, random_classifier, builtin_dataset)
    assert target.read_bytes() == old
    assert not [p.name for p in target.parent.iterdir() if atomic.is_temporary_name(p.name)]


# ----------------------------------------------------------------------------- eval's outputs, read back

@pytest.fixture(scope="module")
def voted(random_classifier, builtin_dataset, tmp_path_factory) -> tuple[dict, Path]:
    """The random classifier evaluated with --aggregation vote."""
    out = tmp_path_factory.mktemp("voted")
    summary = evaluate(EvalConfig(run=str(random_classifier), out=str(out), aggregation="vote", device="cpu",
                                  precision="fp32",
                                  tests=[f"set={builtin_dataset / 'real'},{builtin_dataset / 'fake'}"]))
    results = summary["results"]["set"]
    aps = {mode: round(100 * results[mode]["ap"], 1) for mode in results}
    assert aps["vote"] != aps["after_softmax"], aps  # the aggregations rank the images differently
    return summary, out


def _scores(out: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(out / "scores_set.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return ([row["path"] for row in rows], np.array([int(row["label"]) for row in rows]),
            np.array([float(row["score"]) for row in rows]))


def test_the_scores_csv_labels_each_image_by_its_folder_and_scores_it_by_the_aggregation(voted,
                                                                                        builtin_dataset) -> None:
    """Changes: every label written as 0; the scores of another aggregation than --aggregation."""
    summary, out = voted
    paths, labels, scores = _scores(out)
    expected = [0 if Path(path).is_relative_to(builtin_dataset / "real") else 1 for path in paths]
    counts = summary["results"]["set"]["vote"]
    assert labels.tolist() == expected and (len(labels), labels.sum()) == (counts["n"], counts["n_fake"])
    assert 0 < labels.sum() < len(labels)
    assert average_precision_score(labels, scores) == pytest.approx(summary["results"]["set"]["vote"]["ap"], abs=1e-9)


def test_the_pr_curve_is_that_of_the_chosen_aggregation(voted, tmp_path) -> None:
    """Change: the PR curve drawn from after_softmax scores whatever --aggregation says (its legend shows the AP of
    the curve drawn, which differs between aggregations here). The figure must be the one the scores CSV gives."""
    summary, out = voted
    _, labels, scores = _scores(out)  # vote scores are fractions of patches: 6 decimals keep their order and ties
    plot_pr_curves({"set": (scores, labels)}, tmp_path / "expected.png", title=f"{summary['model']} (vote)")
    drawn = np.asarray(Image.open(out / "pr_curve.png").convert("RGB"))
    expected = np.asarray(Image.open(tmp_path / "expected.png").convert("RGB"))
    assert drawn.shape == expected.shape and np.array_equal(drawn, expected)


# ----------------------------------------------------------------------------- training: best, log, validation

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    from patchscope.forensics.builtin_images import write_builtin_dataset

    return write_builtin_dataset(tmp_path_factory.mktemp("small"), {"train": 16, "val": 8, "test": 8}, size=48, seed=0)


def train_config(dataset: Path, out: Path, **changes) -> TrainConfig:
    """lr 1e-2 on this data: epochs 1-3 improve on the best validation patch accuracy, epoch 4 does not."""
    settings = dict(real=str(dataset / "real"), fake=str(dataset / "fake"), out=str(out), model="xception_block1",
                    load_size=32, crop_size=32, batch_size=8, lr=1e-2, max_epochs=4, patience=10, device="cpu",
                    seed=0, init="kaiming", precision="fp32")
    return TrainConfig(**{**settings, **changes})


def _log(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_best_holds_the_weights_of_the_best_epoch_not_of_the_last(small_dataset, tmp_path) -> None:
    """Change: best.safetensors written after every epoch (best.json and best_epoch still right)."""
    fit(train_config(small_dataset, tmp_path / "four"))
    assert [line["best_epoch"] for line in _log(tmp_path / "four")] == [1, 2, 3, 3]
    fit(train_config(small_dataset, tmp_path / "three", max_epochs=3))
    best = (tmp_path / "four" / "best.safetensors").read_bytes()
    assert best == (tmp_path / "three" / "last.safetensors").read_bytes()  # the weights after epoch 3
    assert best != (tmp_path / "four" / "last.safetensors").read_bytes()
    assert json.loads((tmp_path / "four" / "best.json").read_text())["epoch"] == 3


class Killed(BaseException):
    pass


def test_a_resume_drops_a_log_line_written_after_the_last_checkpoint(small_dataset, tmp_path) -> None:
    """Change: a resume keeping the metrics.jsonl lines of epochs after the last committed one (what a kill between
    an epoch's log line and its checkpoint leaves): the epoch, trained again, would be logged twice."""
    fit(train_config(small_dataset, tmp_path / "straight"))

    def killed_after_epoch_2(record: dict) -> None:
        if record["epoch"] == 2:
            raise Killed

    run = tmp_path / "resumed"
    with pytest.raises(Killed):
        fit(train_config(small_dataset, run), on_epoch_end=killed_after_epoch_2)
    runfolder.release(run)
    epoch_commit.append_line(run / "metrics.jsonl", json.dumps({**_log(run)[-1], "epoch": 3}))
    fit(train_config(small_dataset, run), resume=True)
    assert [line["epoch"] for line in _log(run)] == [1, 2, 3, 4]
    assert _log(run) == _log(tmp_path / "straight")


@pytest.fixture(scope="module")
def resized_run(small_dataset, tmp_path_factory) -> Path:
    """Two epochs at load size 40, crop size 32, of 48 px images: training crops at random, validation centres."""
    run = tmp_path_factory.mktemp("resized") / "run"
    fit(train_config(small_dataset, run, load_size=40, crop_size=32, max_epochs=2, eval_batch_size=64))
    return run


def test_validation_scores_centre_crops_of_the_resized_images(resized_run, small_dataset, tmp_path) -> None:
    """Change: the validation split loaded with the training transforms (random crops and flips): its score then
    differs from eval's of the same checkpoint on the same split at the trained sizes. Validation scores the
    centre crop, which eval scores under view "crop" (its "auto" scores a patch model's whole resized image)."""
    last = _log(resized_run)[-1]
    summary = evaluate(EvalConfig(run=str(resized_run), which="last", split="val", out=str(tmp_path / "eval"),
                                  load_size=40, crop_size=32, view="crop", batch_size=64, device="cpu",
                                  precision="fp32",
                                  tests=[f"val={small_dataset / 'real'},{small_dataset / 'fake'}"]))
    scored = summary["results"]["val"]["after_softmax"]
    assert scored["patch_acc"] == pytest.approx(last["val_patch_acc"], abs=1e-12)
    assert scored["ap"] == pytest.approx(last["val_ap"], abs=1e-12)


def test_eval_scores_at_the_size_the_classifier_was_trained_at(resized_run, small_dataset, tmp_path) -> None:
    """Change: eval ignoring the run's load and crop sizes (the 48 px images scored as they are)."""
    tests = [f"test={small_dataset / 'real'},{small_dataset / 'fake'}"]
    default = evaluate(EvalConfig(run=str(resized_run), out=str(tmp_path / "default"), tests=tests, device="cpu",
                                  precision="fp32"))
    assert (default["load_size"], default["crop_size"]) == (40, 32)
    explicit = evaluate(EvalConfig(run=str(resized_run), out=str(tmp_path / "explicit"), tests=tests, device="cpu",
                                   precision="fp32", load_size=40, crop_size=32))
    native = evaluate(EvalConfig(run=str(resized_run), out=str(tmp_path / "native"), tests=tests, device="cpu",
                                 precision="fp32", load_size=48, crop_size=48))
    assert _scores_of(tmp_path / "default") == _scores_of(tmp_path / "explicit")
    assert _scores_of(tmp_path / "default") != _scores_of(tmp_path / "native")  # the sizes do matter here
    assert default["results"] == explicit["results"] != native["results"]


def _scores_of(out: Path) -> list[list[str]]:
    return list(csv.reader((out / "scores_test.csv").read_text().splitlines()))


# ----------------------------------------------------------------------------- finetuning and the classifier's view

@pytest.fixture(scope="module")
def reals() -> torch.Tensor:
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    crops = random_crops(builtin_photos(), 16, RESOLUTION, seed=0)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("classifier_weight", [1.0, 0.0])
def test_the_generator_step_follows_the_gan_loss_beside_the_classifiers(reals, classifier_weight) -> None:
    """Change: the GAN term dropped from the generator's loss (loss_g = w · L_real(G, C) alone). The generator's
    update must then depend on its discriminator: one step against two critics gives two generators."""
    from tests.attacks.test_finetune import detector

    trained = []
    for critic_seed in (0, 1):
        generator = tiny_pgan(0)[0]
        generator.discriminator = tiny_pgan(critic_seed)[1]
        attack = GeneratorFinetuner(generator, detector(), reals,
                                    FinetuneSettings(classifier_weight=classifier_weight, ema_beta=0.5))
        result = attack.run(1, batch=4, progress=False)
        trained.append(result.trained.state_dict())
    assert any(not torch.equal(value, trained[1][key]) for key, value in trained[0].items())


@pytest.mark.parametrize("height, width, load_size", [(19, 19, None), (16, 23, None), (32, 32, 35), (20, 27, 19)])
def test_the_classifier_input_crops_the_centre_as_torchvision_rounds_it(height, width, load_size) -> None:
    """Change: the crop's offsets floored instead of rounded; they differ when the margin is odd and its half
    rounds up (3 px: offset 2, not 1; 7 px: 4, not 3), as forensics.data's evaluation crops round (torchvision)."""
    images = torch.linspace(-1, 1, 2 * 3 * height * width).reshape(2, 3, height, width)
    resized = images
    if load_size is not None:
        short = min(height, width)
        size = (load_size * height // short, load_size * width // short)
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    expected = center_crop(resized, [16, 16])
    assert torch.equal(ClassifierInput(load_size, 16)(images), expected)
