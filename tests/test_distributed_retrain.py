"""torchrun (gloo on CPU, 2 processes): `retrain` shares its sampling, training and scoring among the ranks and
gives what one process gives; rank 0 alone writes; a rerun reuses every stage; refusals reach every rank.

Every multi-process run is a `torchrun --nproc_per_node 2 --standalone` subprocess with a timeout, so a hang fails
the test instead of blocking the suite. The single-process and torchrun studies are made once (module fixtures)
and the tests that change the torchrun one come last.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from patchscope.common.config import read_yaml
from tests.test_distributed import BIN, _env, assert_same_weights, ok, single, torchrun

DEVICE = ["--device", "cpu", "--precision", "fp32"]
COUNTS = {"train": 16, "val": 8, "test": 8}
SIZE, SAMPLE_SEED, CHUNK = 32, 3, 4
LR = 1e-3  # the new classifier's Adam: one epoch of 16 real + 16 fake images in batches of 4, 8 steps
STAGES_REUSED = "stages: sample reused, train reused, eval_old reused, eval_new reused"
# What a rerun writes again whatever it finds (the records and the tables); everything else must stay untouched.
REWRITTEN = {"config.yaml", "comparison.json", "comparison.csv", "comparison.png", "summary.txt",
             "retrain/config.yaml", "retrain/metrics.json", "retrain/metrics.csv", "retrain/fakes/manifest.json",
             "retrain/classifier/config.yaml"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny PGANs (original, finetuned), 32 px reals and the original's fakes (16/8/8), and two base classifiers of
    one epoch with sync_bn: `base` with batch 4 (2 per rank), `base6` with batch 6 (3 per rank: refused)."""
    from patchscope.forensics.train import TrainConfig, fit
    from patchscope.generators.sampling import SampleConfig, sample_dataset
    from tests.attacks.test_retrain import write_reals
    from tests.tiny_models import save_tiny_pgan

    root = tmp_path_factory.mktemp("retrain_world")
    world = {"original": save_tiny_pgan(root / "original.pt", seed=0),
             "finetuned": save_tiny_pgan(root / "finetuned.pt", seed=1),
             "reals": write_reals(root / "reals", COUNTS), "fakes": root / "fakes"}
    sample_dataset(SampleConfig(generator=str(world["original"]), out=str(world["fakes"]), counts=COUNTS,
                                seed=SAMPLE_SEED, size=SIZE, chunk=CHUNK, device="cpu"), progress=False)
    for name, batch in (("base", 4), ("base6", 6)):  # what `patchscope train` runs, without a process to start
        world[name] = root / name
        fit(TrainConfig(real=str(world["reals"]), fake=str(world["fakes"]), out=str(world[name]),
                        model="xception_block1", load_size=SIZE, crop_size=SIZE, batch_size=batch, lr=LR, max_epochs=1,
                        device="cpu", precision="fp32", eval_batch_size=6, sync_bn=True))
    return world


def retrain_args(world: dict[str, Path], out: Path, base: str = "base") -> list[str]:
    # scoring batches of 6: the 16 test images are 3 batches, shared by the two ranks
    return ["retrain", "--classifier", str(world[base]), "--generator", str(world["finetuned"]), "--out", str(out),
            "-n", "4", "--sample-batch-size", "4", "--batch-size", "6", *DEVICE]


@pytest.fixture(scope="module")
def studies(world, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("studies")
    one, two = root / "one", root / "two"
    ok(single(retrain_args(world, one)))
    return {"one": one, "two": two, "run": ok(torchrun(retrain_args(world, two)))}


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` but the lock files: relative path -> (mtime in ns, bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".patchscope.lock"}


def meta(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- one process vs two

def test_sharded_retrain_samples_the_same_fakes_and_scores_the_old_classifier_alike(studies):
    one, two, run = studies["one"] / "retrain", studies["two"] / "retrain", studies["run"]
    assert "is not sharded" not in run.stderr
    for split, count in COUNTS.items():
        names = sorted(p.name for p in (one / "fakes" / split).glob("*.png"))
        assert len(names) == count and names == sorted(p.name for p in (two / "fakes" / split).glob("*.png"))
        for name in names:  # rank r rendered the chunks k with k % 2 == r: the union is one process's set
            assert (two / "fakes" / split / name).read_bytes() == (one / "fakes" / split / name).read_bytes()
    assert meta(two / "fakes" / "manifest.json") == meta(one / "fakes" / "manifest.json")
    # the old classifier's scores are gathered in item order: the same metrics, byte for byte
    assert (two / "eval" / "old" / "metrics.json").read_bytes() == (one / "eval" / "old" / "metrics.json").read_bytes()
    tables = [meta(run_dir / "metrics.json") for run_dir in (one, two)]
    assert tables[1]["metrics"]["old"] == tables[0]["metrics"]["old"]
    # ... and rank 0 alone found its most predictive patches on the same fakes (all of them, not its share)
    top = [[(r["index"], r["label"], r["prob"], r["semantic"]) for r in meta(study / "patches" / "old" / "patches.json")
            ["top"]] for study in (studies["one"], studies["two"])]
    assert top[1] == top[0] and len(top[0]) == 8


def test_the_new_classifier_trains_under_ddp_and_records_two_processes(studies):
    one, two = studies["one"] / "retrain", studies["two"] / "retrain"
    assert read_yaml(two / "classifier" / "config.yaml")["world_size"] == 2
    assert read_yaml(one / "classifier" / "config.yaml")["world_size"] == 1
    for name in ("best.json", "last.json"):
        assert meta(two / "classifier" / name)["world_size"] == 2
        assert meta(two / "classifier" / name)["config"]["world_size"] == 2
    # the retrain's record leaves the number of processes to the classifier's own (a resume may change it)
    records = [read_yaml(run_dir / "config.yaml") for run_dir in (one, two)]
    assert records[1]["train"]["world_size"] is None
    for record in records:  # the same but for the new classifier's own folders
        assert record["train"].pop("fake").endswith("retrain/fakes")
        assert record["train"].pop("out").endswith("retrain/classifier")
    assert records[1] == records[0]
    # sync_bn (the old classifier's setting): the global batch's statistics and DDP-averaged gradients, so the
    # single-process steps up to the order of the additions. Observed: 7.3e-5 at most after 8 Adam steps; atol is
    # one step (lr), which each rank training on its own half of the batch (no averaging) would far exceed.
    assert_same_weights(one / "classifier" / "last.safetensors", two / "classifier" / "last.safetensors", atol=LR)
    logs = [[json.loads(line) for line in (run_dir / "classifier" / "metrics.jsonl").read_text().splitlines()]
            for run_dir in (one, two)]
    assert len(logs[1]) == len(logs[0]) == 1 and logs[1][0]["images"] == logs[0][0]["images"] == 32
    assert logs[1][0]["train_loss"] == pytest.approx(logs[0][0]["train_loss"], rel=1e-5)  # 3e-7 observed
    new = [meta(run_dir / "metrics.json")["metrics"]["new"] for run_dir in (one, two)]
    for name in ("original", "finetuned"):
        assert new[1][name].keys() == new[0][name].keys()
        assert new[1][name]["n"] == new[0][name]["n"] == 2 * COUNTS["test"]
        for key, value in new[1][name].items():
            assert 0.0 <= value <= 1.0 or key == "n", (name, key, value)
            # nearly the same weights: a score may cross a threshold or swap with a neighbour, not more
            assert value == pytest.approx(new[0][name][key], abs=1 / COUNTS["test"]), (name, key)


def test_every_table_is_written_once_and_printed_once(studies):
    one, two, run = studies["one"], studies["two"], studies["run"]
    assert sorted(files(two)) == sorted(files(one))  # no file of rank 1's own, no leftover of a second writer
    assert run.stdout.count("results:") == 1 and run.stdout.count("What is still detectable") == 1
    assert run.stderr.count("stages: sample ran, train ran, eval_old ran, eval_new ran") == 1  # logged by rank 0
    table = meta(two / "retrain" / "metrics.json")
    with open(two / "retrain" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["classifier"], r["test_set"]) for r in rows] == [
        ("old", "original"), ("old", "finetuned"), ("new", "original"), ("new", "finetuned")]
    for row in rows:
        assert float(row["ap"]) == pytest.approx(table["metrics"][row["classifier"]][row["test_set"]]["ap"])
    assert meta(two / "comparison.json")["metrics"] == table["metrics"]


LIBRARY = '''
import json, logging, sys
import torch
from patchscope.attacks.retrain import RetrainConfig, retrain
from patchscope.common import distributed
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
classifier, generator, out, results = sys.argv[1:]
result = retrain(RetrainConfig(classifier=classifier, generator=generator, out=out, device="cpu", precision="fp32",
                               sample_batch_size=4, eval_batch_size=6), progress=False)
# a file per rank: two processes' stdout through torchrun's one pipe may lose or merge lines
with open(f"{results}/result_{distributed.rank()}.json", "w") as handle:
    json.dump({"stages": result.stages, "metrics": result.metrics, "train": result.train,
               "new": str(result.classifier_checkpoint)}, handle)
'''


def test_every_rank_calling_retrain_returns_the_same_result(world, studies, tmp_path):
    """The library call: every rank calls `attacks.retrain.retrain`; each returns what rank 0 decided and measured,
    and the training, deterministic under gloo, repeats the torchrun study's new classifier."""
    script = tmp_path / "retrain.py"
    script.write_text(LIBRARY)
    run = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", str(script),
                          str(world["base"]), str(world["finetuned"]), str(tmp_path / "out"), str(tmp_path)],
                         capture_output=True, text=True, timeout=240, env=_env())
    assert run.returncode == 0, run.stderr[-4000:]
    results = {rank: (tmp_path / f"result_{rank}.json").read_text() for rank in (0, 1)}
    assert results[0] == results[1]
    result = json.loads(results[0])
    assert result["stages"] == {"sample": "ran", "train": "ran", "eval_old": "ran", "eval_new": "ran"}
    assert run.stderr.count("stages: sample ran") == 1  # logged by rank 0 only
    assert result["metrics"] == meta(studies["two"] / "retrain" / "metrics.json")["metrics"]
    assert ((tmp_path / "out" / "classifier" / "last.safetensors").read_bytes()
            == (studies["two"] / "retrain" / "classifier" / "last.safetensors").read_bytes())


# ----------------------------------------------------------------------------- refusals: one line, no hang

def test_a_folder_holding_other_files_is_refused_once(world, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = torchrun(retrain_args(world, out), timeout=120)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    lines = errors(result)
    assert len(lines) == 1 and "not a retrain study folder" in lines[0], result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_batch_the_ranks_cannot_split_is_refused_once_before_anything_is_sampled(world, tmp_path):
    out = tmp_path / "study"
    result = torchrun(retrain_args(world, out, base="base6"), timeout=120)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    lines = errors(result)
    assert len(lines) == 1 and "batch size 6" in lines[0] and "divides 3" in lines[0], result.stderr[-3000:]
    assert not (out / "config.yaml").exists() and not (out / "retrain").exists()


def test_changed_settings_are_refused_once_and_change_nothing(world, studies):
    two = studies["two"]
    before = files(two)
    result = torchrun([*retrain_args(world, two), "--resume", "--seed", "9"], timeout=120)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    lines = errors(result)
    assert len(lines) == 1 and "cannot resume with different seed" in lines[0], result.stderr[-3000:]
    assert files(two) == before


def test_a_refusal_inside_the_shared_stages_reaches_every_rank(world, studies, tmp_path):
    """A copied study: its own record accepts the new place (out may change), the retrain's does not (its new
    classifier's folders moved): rank 0 refuses while the other rank waits in the same retrain call."""
    copy = tmp_path / "copy"
    shutil.copytree(studies["two"], copy)
    result = torchrun([*retrain_args(world, copy), "--resume"], timeout=120)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    lines = errors(result)
    assert len(lines) == 1 and "cannot resume with different train.fake" in lines[0], result.stderr[-3000:]


# ----------------------------------------------------------------------------- reruns (change the torchrun study)

def test_a_torchrun_rerun_reuses_every_stage_and_rewrites_only_the_records(world, studies):
    two = studies["two"]
    before = files(two)
    run = ok(torchrun([*retrain_args(world, two), "--resume"]))
    assert run.stderr.count(STAGES_REUSED) == 1
    after = files(two)
    assert after.keys() == before.keys()
    assert {name for name in after if after[name][1] != before[name][1]} == set()  # the same bytes everywhere
    touched = {name for name in after if after[name][0] != before[name][0]}
    assert touched <= REWRITTEN, touched - REWRITTEN  # fakes, checkpoints, evaluations and patches: untouched


def test_a_torchrun_study_resumes_on_one_process(world, studies):
    """Like train's --resume, a retrain may go on with another number of processes: nothing is refused, nothing
    is redone, and the checkpoints still record the two processes that trained them."""
    two = studies["two"]
    weights = (two / "retrain" / "classifier" / "best.safetensors").read_bytes()
    run = ok(single([*retrain_args(world, two), "--resume"]))
    assert STAGES_REUSED in run.stderr
    assert (two / "retrain" / "classifier" / "best.safetensors").read_bytes() == weights
    assert meta(two / "retrain" / "classifier" / "best.json")["world_size"] == 2
