"""`--compile` for real (torch.compile's CPU backend, which needs a C++ compiler): eval, exaggerate, finetune and
sample give what their uncompiled runs give, up to float rounding; finetune saves the networks' own keys; sample's
compiled PNGs are byte-identical run to run, on resume and across torchrun's processes; a sharded compiled
finetuning trains the single-process generator. Each compiles its tiny networks once or twice, seconds to about a
minute on a small CPU (less once torch's compile cache holds them): marked slow."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchscope.analysis.finetune_study import run_finetune
from patchscope.analysis.shift_grid import run_exaggerate
from patchscope.attacks.shift import load_shift
from patchscope.common.compiled import missing_compiler
from patchscope.forensics.evaluate import evaluate
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.sampling import sample_dataset
from tests.test_compile_options import (calls, eval_config, exaggerate_config, finetune_config,  # noqa: F401
                                       generator_states, pngs, sample_config, sources)
from tests.test_distributed import ok, single, torchrun
from tests.test_distributed_attacks import finetune_args, generator_weights, models, reals  # noqa: F401

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None,
                                 reason="torch.compile needs a C++ compiler here")]


@pytest.fixture(autouse=True)
def no_fallback(caplog):
    """A compile that fell back to eager would pass the comparisons below untested: it fails the test instead."""
    with caplog.at_level(logging.WARNING, logger="patchscope.compile"):
        yield
    assert not [r.getMessage() for r in caplog.records if r.name == "patchscope.compile"]


def really_compiled(calls, *names: str) -> None:
    assert set(calls) == set(names) and all(w.compiled for w in calls.wrappers)


def test_compiled_eval_scores_as_uncompiled_eval(sources, builtin_dataset, tmp_path, calls):
    eager = evaluate(eval_config(sources, builtin_dataset, tmp_path / "eager"))
    summary = evaluate(eval_config(sources, builtin_dataset, tmp_path / "compiled", compile=True))
    really_compiled(calls, "the classifier")
    scores = [np.loadtxt(tmp_path / run / "scores_b.csv", delimiter=",", skiprows=1, usecols=(1, 2))
              for run in ("eager", "compiled")]
    np.testing.assert_array_equal(scores[1][:, 0], scores[0][:, 0])  # labels
    np.testing.assert_allclose(scores[1][:, 1], scores[0][:, 1], rtol=0, atol=2e-6)  # written to 6 decimals
    for mode, metrics in eager["results"]["b"].items():
        for key, value in metrics.items():
            assert summary["results"]["b"][mode][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (mode, key)


def test_compiled_exaggeration_fits_and_scores_the_uncompiled_shift(sources, tmp_path, calls):
    eager = run_exaggerate(exaggerate_config(sources, tmp_path / "eager"))
    summary = run_exaggerate(exaggerate_config(sources, tmp_path / "compiled", compile=True))
    really_compiled(calls, "the classifier", "the generator", "LPIPS")
    (shift, meta), (reference, _) = load_shift(tmp_path / "compiled"), load_shift(tmp_path / "eager")
    assert meta["compile"] is True
    # 3 Adam steps of lr 0.05 from zero: rounding of the gradient moves w by far less than one step
    torch.testing.assert_close(shift, reference, rtol=1e-4, atol=1e-5)
    for row, want in zip(summary["rows"], eager["rows"]):
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_compiled_finetuning_trains_the_uncompiled_generator_and_saves_its_keys(sources, tmp_path, calls):
    run_finetune(finetune_config(sources, tmp_path / "eager"))
    summary = run_finetune(finetune_config(sources, tmp_path / "compiled", compile=True))
    really_compiled(calls, "the classifier", "the generator")
    states, reference = generator_states(tmp_path / "compiled" / "generator.pt"), generator_states(
        tmp_path / "eager" / "generator.pt")
    for name in reference:
        assert list(states[name]) == list(reference[name]), name
        for key in reference[name]:
            # 2 Adam steps of lr 1e-3: rounding moves a weight by far less than a step (observed: 4e-7)
            torch.testing.assert_close(states[name][key], reference[name][key], rtol=0, atol=1e-5, msg=key)
    resume = load_torch(tmp_path / "compiled" / "resume.pt")
    assert list(resume["generator"]) == list(load_torch(tmp_path / "eager" / "resume.pt")["generator"])
    assert resume["settings"]["compile"] is True
    assert summary["rows"][1]["p_fake"] == pytest.approx(
        json.loads((tmp_path / "eager" / "before_after.json").read_text())["rows"][1]["p_fake"], abs=1e-4)


def test_compiled_samples_match_uncompiled_ones_and_are_byte_identical_run_to_run_and_on_resume(sources, tmp_path,
                                                                                             calls):
    sample_dataset(sample_config(sources, tmp_path / "eager", counts={"train": 6}), progress=False)
    sample_dataset(sample_config(sources, tmp_path / "whole", counts={"train": 6}, compile=True), progress=False)
    really_compiled(calls, "the generator")
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["compile"] is True
    for name in pngs(tmp_path / "eager"):
        with Image.open(tmp_path / "eager" / name) as a, Image.open(tmp_path / "whole" / name) as b:
            difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, name  # rounding flips a pixel at most
    # a compiled run stopped after 4 images and resumed gives the uninterrupted compiled run's bytes
    sample_dataset(sample_config(sources, tmp_path / "resumed", compile=True), progress=False)
    sample_dataset(sample_config(sources, tmp_path / "resumed", counts={"train": 6}, compile=True), progress=False)
    assert pngs(tmp_path / "resumed") == pngs(tmp_path / "whole")


def test_sharded_compiled_finetuning_trains_the_single_process_generator(models, reals, tmp_path):
    """The compiled modules share their parameters with the networks, whose gradients the ranks sum by hand."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single(finetune_args(models, reals, one, steps=1)))
    result = ok(torchrun([*finetune_args(models, reals, two, steps=1), "--compile"], timeout=540))
    assert "torch.compile of" not in result.stderr and "runs uncompiled" not in result.stderr  # no fallback
    assert load_torch(two / "resume.pt")["settings"]["compile"] is True
    # One Adam step (lr 1e-3) moves each weight by about lr * sign(gradient), whatever the gradient's size: where a
    # gradient is within rounding of zero, compiled kernels (which round otherwise than the uncompiled ones, and
    # per rank on half the batch) may flip that sign. Observed: 5 of 30122 weights off by more than 1e-5, at most
    # 1.9e-4. With the gradients not summed over the ranks (measured by disabling the sum): 14%, by up to 2e-3.
    x, y = (generator_weights(run / "generator.pt") for run in (one, two))
    assert x.keys() == y.keys()
    differences = torch.cat([(x[key] - y[key]).abs().flatten() for key in x])
    assert (differences > 1e-5).float().mean() < 1e-3 and differences.max() < 2e-3


def test_sharded_compiled_sampling_writes_the_single_process_compiled_pngs_byte_for_byte(models, tmp_path):
    args = ["--train", "5", "--chunk", "2", "--batch-size", "2", "--device", "cpu", "--compile"]
    ok(single(["sample", str(models / "tiny.pt"), "--out", str(tmp_path / "one"), *args]))
    result = ok(torchrun(["sample", str(models / "tiny.pt"), "--out", str(tmp_path / "two"), *args], timeout=540))
    assert "runs uncompiled" not in result.stderr
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one") and len(pngs(tmp_path / "one")) == 5
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("one", "two")]
    assert manifests[0] == manifests[1] and manifests[0]["compile"] is True


def test_compiled_ddp_training_takes_the_uncompiled_ddp_step(builtin_dataset, tmp_path):
    """train --compile under torchrun compiles the DistributedDataParallel module (with --sync-bn's all-reduce
    layer): one Adam step over a global batch of 192 on 2 processes lands where the uncompiled DDP step lands. One
    step moves a weight by about lr * sign(gradient), so gradients left unsummed over the ranks (each rank's half
    batch) would flip the sign of a large share of them; compiled rounding flips only those within rounding of zero.
    Observed: 0.4% of 55,970 values off by more than 1e-5, at most 2.0e-3 (2 lr); with the compiled module taken
    outside DDP (its gradients unsummed): 60%."""
    from tests.test_distributed import train_args

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    def args(out):
        given = train_args(builtin_dataset, out, 1)
        given[given.index("--batch-size") + 1] = "192"  # the whole training set: one step
        return given

    ok(torchrun(args(eager)))
    result = ok(torchrun([*args(compiled), "--compile"], timeout=540))
    assert "torch.compile of" not in result.stderr and "runs uncompiled" not in result.stderr  # no fallback
    x, y = (load_file(run / "last.safetensors") for run in (eager, compiled))
    assert x.keys() == y.keys()
    differences = torch.cat([(x[k].float() - y[k].float()).abs().flatten() for k in x if x[k].is_floating_point()])
    assert (differences > 1e-5).float().mean() < 0.02 and differences.max() < 2.5e-3
    losses = [json.loads((run / "metrics.jsonl").read_text())["train_loss"] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # the loss before the step: the same forward
