"""torchrun (gloo on CPU, 2 processes): `exaggerate` (and `finetune`) shard their batches and give what one process
gives; rank 0 alone writes; an indivisible global batch is refused once and no rank hangs.

Every multi-process run is a `torchrun --nproc_per_node 2 --standalone` subprocess with a timeout, so a hang fails
the test instead of blocking the suite.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_distributed import ok, single, torchrun

DEVICE = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny PGAN (tiny.pt) and a classifier run (classifier/best) trained on 32 px crops."""
    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.forensics.models import build_model
    from tests.tiny_models import save_tiny_pgan

    root = tmp_path_factory.mktemp("models")
    save_tiny_pgan(root / "tiny.pt", seed=0)
    save_classifier(root / "classifier" / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    return root


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_the_new_helpers_are_single_process_no_ops(monkeypatch):
    from patchscope.attacks import finetune_ddp
    from patchscope.common import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.share_of(5, "batch") == (0, 5)
    assert distributed.gather_keyed([(4, "b"), (0, "a")]) == ["a", "b"]
    with pytest.raises(RuntimeError):
        distributed.gather_keyed([(0, "a"), (0, "b")])
    rows = torch.arange(6.0)
    assert finetune_ddp.local(rows, 6) is rows and finetune_ddp.share(6) == 1
    assert finetune_ddp.global_draw(3, torch.arange).tolist() == [0, 1, 2]
    with pytest.raises(Exception) as caught, distributed.alike():
        raise distributed.InputError("x")
    assert type(caught.value) is distributed.InputError  # rank 0 (alone): printed


# ----------------------------------------------------------------------------- exaggerate

def exaggerate_args(models: Path, out: Path, batch: int = 4) -> list[str]:
    return ["exaggerate", "--generator", str(models / "tiny.pt"), "--classifier", str(models / "classifier"),
            "--out", str(out), "--steps", "4", "--batch-size", str(batch), "--lr", "0.05", "--eval-n", "7",
            "--eval-batch-size", "2", "--ks", "-1,0,1", "--grid-rows", "3", "--lpips-random", *DEVICE]


def test_sharded_exaggeration_learns_the_single_process_shift_and_scores_it_alike(models, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single(exaggerate_args(models, one)))
    result = ok(torchrun(exaggerate_args(models, two)))
    assert "is not sharded" not in result.stderr
    assert result.stdout.count("results:") == 1  # printed by rank 0 only
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # Each rank sums its half of the batch, then the two halves are added: the same terms in another order, so
    # w agrees to float32 rounding, not bit for bit. Adam moves every component by about lr = 0.05 per step, so a
    # component whose steps partly cancel is small while keeping the rounding of every step: rtol 1e-5 with an
    # absolute floor of 1e-5 of the 4 steps' total movement (2e-6).
    shifts = [torch.load(run / "shift.pt", weights_only=True)["shift"] for run in (one, two)]
    assert shifts[0].abs().min() > 0 and not torch.equal(shifts[0], torch.zeros(8))
    torch.testing.assert_close(shifts[1], shifts[0], rtol=1e-5, atol=2e-6)
    # every held-out batch is scored whole by one rank, so P(fake) differs only through w
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (one, two)]
    assert [row["k"] for row in metrics[1]["rows"]] == [-1.0, 0.0, 1.0]
    for mine, theirs in zip(metrics[1]["rows"], metrics[0]["rows"]):
        assert mine["n"] == theirs["n"] == 7
        assert mine["p_fake"] == pytest.approx(theirs["p_fake"], abs=1e-5)
        assert mine["lpips"] == pytest.approx(theirs["lpips"], abs=1e-5)
    # the training log holds the global-batch terms, once per step
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert len(logs[1]) == len(logs[0]) == 4
    for mine, theirs in zip(logs[1], logs[0]):
        assert mine.keys() == theirs.keys()
        for key in ("loss", "fake_loss", "lpips", "p_fake"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # resume under torchrun: the finished shift is kept and re-scored with other ks
    before = (two / "shift.pt").read_bytes()
    args = exaggerate_args(models, two)
    args[args.index("--ks") + 1] = "0,2"
    ok(torchrun([*args, "--resume"]))
    assert (two / "shift.pt").read_bytes() == before
    assert [row["k"] for row in json.loads((two / "metrics.json").read_text())["rows"]] == [0.0, 2.0]


def test_an_exaggeration_batch_the_ranks_cannot_split_is_refused_once_and_no_rank_hangs(models, tmp_path):
    result = torchrun(exaggerate_args(models, tmp_path / "run", batch=3), timeout=120)
    assert result.returncode != 0
    lines = errors(result)
    assert len(lines) == 1 and "--batch-size 3" in lines[0] and "multiple of 2" in lines[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_refused_exaggeration_folder_stops_every_rank(models, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("not a run")
    result = torchrun(exaggerate_args(models, out), timeout=120)
    assert result.returncode != 0 and len(errors(result)) == 1, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]


# ----------------------------------------------------------------------------- finetune

@pytest.fixture(scope="module")
def reals(tmp_path_factory) -> Path:
    """12 random 16 px 'real' images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("reals")
    rng = torch.Generator().manual_seed(3)
    for i in range(12):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def finetune_args(models: Path, reals: Path, out: Path, steps: int = 4, batch: int = 8) -> list[str]:
    return ["finetune", "--generator", str(models / "tiny.pt"), "--classifier", str(models / "classifier"),
            "--real", str(reals), "--out", str(out), "--steps", str(steps), "--batch-size", str(batch),
            "--checkpoint-every", "2", "--log-every", "2", "--eval-n", "4", "--compare-n", "4", "--grid-rows", "2",
            "--lpips-random", *DEVICE]


def generator_weights(path: Path) -> dict[str, torch.Tensor]:
    from patchscope.generators import load_generator

    return {k: v.detach().clone() for k, v in load_generator(path).state_dict().items()}


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    x, y = generator_weights(a), generator_weights(b)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=0, atol=atol, msg=key)


def test_sharded_finetuning_trains_the_single_process_generator_and_writes_once(models, reals, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single(finetune_args(models, reals, one)))
    result = ok(torchrun(finetune_args(models, reals, two)))
    assert "is not sharded" not in result.stderr
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # Per-rank batch 4 = PGAN's minibatch-stddev group, so D sees what it sees in one process, and every draw is
    # the single-process one; only the order of the additions (two half-batch sums, then the all-reduce) differs.
    # Observed: 2.4e-7 at most. atol 1e-5 = 1% of one Adam step (lr 1e-3): far below what a real difference (a
    # wrong slice or mean, a missed all-reduce: whole steps of about lr) gives, above float32 rounding.
    assert_close_weights(one / "generator.pt", two / "generator.pt", atol=1e-5)
    logs = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [line["step"] for line in logs[1]] == [line["step"] for line in logs[0]] == [0, 2, 4]  # written once
    # the logged losses are means over the global batch, alike up to rounding (logged to 6 decimals)
    for mine, theirs in zip(logs[1][1:], logs[0][1:]):
        for key in ("loss_d", "loss_g_gan", "loss_classifier", "loss_g"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=2e-6), key
    table = json.loads((two / "before_after.json").read_text())
    assert table["steps"] == 4 and len(table["rows"]) == 2


def test_a_killed_sharded_finetuning_resumes_to_the_uninterrupted_generator(models, reals, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.test_distributed import BIN, _env

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ok(torchrun(finetune_args(models, reals, whole, steps=20)))
    process = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", "--no-python",
                                str(BIN / "patchscope"), "--threads", "1",
                                *finetune_args(models, reals, killed, steps=20)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if json.loads((killed / "checkpoint.json").read_text())["step"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert process.poll() is None, "finetuning ended before it could be killed"
            time.sleep(0.1)
        else:
            raise AssertionError("no checkpoint committed in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (killed / "before_after.json").exists(), "killed too late: the run had finished"
    ok(torchrun([*finetune_args(models, reals, killed, steps=20), "--resume"]))
    # the same ranks, the same slices, the same order of additions: a resume repeats the uninterrupted run
    assert_close_weights(whole / "generator.pt", killed / "generator.pt", atol=0)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 21, 2))


def test_a_finetuning_batch_the_ranks_cannot_split_is_refused_once_and_no_rank_hangs(models, reals, tmp_path):
    result = torchrun(finetune_args(models, reals, tmp_path / "run", batch=5), timeout=120)
    assert result.returncode != 0
    lines = errors(result)
    assert len(lines) == 1 and "--batch-size 5" in lines[0] and "multiple of 2" in lines[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "run").exists()
