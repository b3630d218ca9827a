"""Training killed while it saves an epoch: at every step of the save, the resumed run ends with the bytes of an
uninterrupted one (fp32, CPU), and a folder changed by hand or left half-saved by an older version is refused."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from patchscope.common.errors import InputError
from patchscope.common.runfolder import LOCK_FILE
from patchscope.forensics import epoch_commit
from patchscope.forensics.train import TrainConfig, fit

EPOCHS = 4
FILE_OPS = ("write_bytes", "write_json", "move", "append_line", "remove_tree")  # epoch_commit's steps on disk
TIMING = ("seconds", "images_per_s")  # the only log fields a rerun may change


# The file operations of one epoch's save (`epoch_commit.commit`): stage, commit (the manifest), publish, log.
IMPROVED = ("write_bytes",) * 5 + ("write_json",) + ("move",) * 5 + ("append_line", "remove_tree")  # best.* too
NOT_IMPROVED = ("write_bytes",) * 3 + ("write_json",) + ("move",) * 3 + ("append_line", "remove_tree")
SAVES = [IMPROVED, IMPROVED, IMPROVED, NOT_IMPROVED]  # epochs 1-4 of the run below
# Kills before every step of the first save, of a save improving on an earlier best, and of one that does not;
# (2, 0) is also "after the first epoch's save".
KILLS = [(epoch, step) for epoch in (1, 3, 4) for step in range(len(SAVES[epoch - 1]))] + [(2, 0)]


class Killed(BaseException):
    """The process dying at a chosen moment: no `except Exception` on the way may catch it."""


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    from patchscope.forensics.builtin_images import write_builtin_dataset

    return write_builtin_dataset(tmp_path_factory.mktemp("small"), {"train": 16, "val": 8}, size=32, seed=0)


def config(dataset: Path, **changes) -> TrainConfig:
    """The run "run" in the current folder: every run's checkpoints then record the same settings, byte for byte."""
    # lr 1e-2 on this data: epochs 1-3 improve on the best, epoch 4 does not (the straight run checks it).
    settings = dict(real=str(dataset / "real"), fake=str(dataset / "fake"), out="run", model="xception_block1",
                    load_size=32, crop_size=32, batch_size=8, lr=1e-2, max_epochs=EPOCHS, patience=10,
                    device="cpu", seed=0, init="kaiming", precision="fp32")
    return TrainConfig(**{**settings, **changes})


def outcome(run: Path) -> dict[str, object]:
    """What a finished run leaves, byte for byte, but for the timing of its log lines."""
    files = {p.name: p.read_bytes() for p in run.iterdir()
             if p.is_file() and p.name not in ("metrics.jsonl", epoch_commit.MANIFEST, LOCK_FILE)}
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
           for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"files": files, "log": log, "committed": epoch_commit.read_manifest(run)["files"],
            "folders": sorted(p.name for p in run.iterdir() if p.is_dir())}


@pytest.fixture(scope="module")
def straight(small_dataset, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        fit(config(small_dataset))
    result = outcome(folder / "run")
    assert [line["best_epoch"] for line in result["log"]] == [1, 2, 3, 3]  # improved, improved, improved, not
    assert {"best.safetensors", "best.json", "last.safetensors", "last.json", "resume.pt"} <= set(result["files"])
    return result


def stop_after(epoch: int):
    """An on_epoch_end that kills the run once `epoch` is saved."""
    def stop(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Killed(f"after epoch {epoch}")
    return stop


def instrument(monkeypatch, kill_at: int | None = None) -> list[tuple[int, str]]:
    """Count the file operations of every epoch's commit as (epoch, name); with `kill_at`, raise Killed instead
    of doing that one, leaving what a kill inside a write leaves: a torn temporary file beside its target."""
    done: list[tuple[int, str]] = []
    epoch = [0]
    real_commit = epoch_commit.commit

    def commit(out, number, files, record):
        epoch[0] = number
        try:
            return real_commit(out, number, files, record)
        finally:
            epoch[0] = 0

    def wrap(name, real):
        def op(*args):
            if not epoch[0]:  # recover's own moves and removals are not part of a save
                return real(*args)
            if len(done) == kill_at:
                if name.startswith("write"):
                    target = Path(args[0])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (target.parent / f".{target.name}.torn01.tmp").write_bytes(b"half a fi")
                raise Killed(f"epoch {epoch[0]}, before {name}")
            done.append((epoch[0], name))
            return real(*args)
        return op

    monkeypatch.setattr(epoch_commit, "commit", commit)
    for name in FILE_OPS:
        monkeypatch.setattr(epoch_commit, name, wrap(name, getattr(epoch_commit, name)))
    return done


@pytest.fixture(scope="module")
def commit_ops(small_dataset, tmp_path_factory) -> list[tuple[int, str]]:
    """Every file operation of an uninterrupted run's commits, in order."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("counted"))
        ops = instrument(patch)
        fit(config(small_dataset))
    return ops


def test_an_epoch_is_staged_then_committed_by_its_manifest_then_published(commit_ops) -> None:
    assert [name for _, name in commit_ops] == [name for save in SAVES for name in save]


@pytest.mark.parametrize("epoch, step", KILLS, ids=[f"epoch{e}-{i:02d}-{SAVES[e - 1][i]}" for e, i in KILLS])
def test_a_kill_at_any_step_of_an_epochs_save_resumes_to_the_bytes_of_an_uninterrupted_run(
        small_dataset, tmp_path, monkeypatch, straight, epoch, step) -> None:
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        instrument(patch, kill_at=sum(map(len, SAVES[:epoch - 1])) + step)
        with pytest.raises(Killed):
            fit(config(small_dataset))
    summary = fit(config(small_dataset), resume=True)
    assert summary["finished"] and summary["epochs"] == EPOCHS
    result, run = outcome(tmp_path / "run"), tmp_path / "run"
    assert result["files"].keys() == straight["files"].keys()
    for name, contents in straight["files"].items():
        assert result["files"][name] == contents, f"{name} differs"
    assert result["log"] == straight["log"]
    assert result["committed"] == straight["committed"]
    assert result["folders"] == straight["folders"] == []  # no staging folder left
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_the_epoch_of_the_original_report_is_trained_once_with_its_own_optimizer(
        small_dataset, tmp_path, monkeypatch, straight, commit_ops, caplog) -> None:
    """Issue 22 #1: killed after epoch 2's last.json but before its resume.pt. Now the epoch was never committed:
    the resume says so, trains epoch 2 again from epoch 1's weights and optimizer, and ends as the straight run."""
    kill_at = next(i for i, (e, name) in enumerate(commit_ops) if e == 2 and name == "write_json")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        instrument(patch, kill_at)
        with pytest.raises(Killed):
            fit(config(small_dataset))
    assert epoch_commit.read_manifest(run)["epoch"] == 1
    assert {p.name for p in (run / epoch_commit.STAGING).iterdir()} >= {"last.json", "resume.pt"}
    with caplog.at_level("WARNING", logger="patchscope.train"):
        fit(config(small_dataset), resume=True)
    assert "epoch 2 was cut short while being saved; it is trained again" in caplog.text
    assert outcome(run)["files"] == straight["files"]


def test_a_checkpoint_file_changed_after_its_commit_is_refused(small_dataset, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    fit(config(small_dataset, max_epochs=1))
    (run / "last.safetensors").write_bytes((run / "last.safetensors").read_bytes()[:-8])
    with pytest.raises(InputError, match=r"last\.safetensors: not the file checkpoint\.json committed for epoch 1 "
                                         r"\(changed or damaged since\); the run cannot be continued"):
        fit(config(small_dataset, max_epochs=2), resume=True)


def test_an_unreadable_manifest_is_refused_in_one_line(small_dataset, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    fit(config(small_dataset, max_epochs=1))
    (run / epoch_commit.MANIFEST).write_text('{"kind": "patchscope-epoch-commit", "epoch": ')
    with pytest.raises(InputError, match=r"checkpoint\.json: unreadable record of the last saved epoch"):
        fit(config(small_dataset, max_epochs=2), resume=True)


def test_a_run_saved_before_epoch_commits_resumes_when_its_files_agree(small_dataset, tmp_path, monkeypatch, straight) -> None:
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        fit(config(small_dataset), on_epoch_end=stop_after(2))
    (run / epoch_commit.MANIFEST).unlink()  # what an earlier patchscope left
    fit(config(small_dataset), resume=True)
    assert outcome(run)["files"] == straight["files"] and outcome(run)["log"] == straight["log"]


def test_a_run_an_earlier_version_left_half_saved_is_refused(small_dataset, tmp_path, monkeypatch) -> None:
    """The old save order (best, last, resume.pt) cut after last.json: last says epoch 3, resume.pt epoch 2."""
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        fit(config(small_dataset), on_epoch_end=stop_after(2))
    (run / epoch_commit.MANIFEST).unlink()
    meta = json.loads((run / "last.json").read_text())
    (run / "last.json").write_text(json.dumps({**meta, "epoch": 3}))
    with pytest.raises(InputError, match=r"an epoch was cut short while being saved \(resume\.pt is at epoch 2, best "
                                         r"2; last\.json at 3, best\.json at 2\); it cannot be continued"):
        fit(config(small_dataset), resume=True)


KILL_ITSELF = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from patchscope.forensics import epoch_commit
    from patchscope.forensics.train import TrainConfig, fit

    torch.set_num_threads(1)  # as the tests' own process: the same sums in the same order
    real_move, moves = epoch_commit.move, []

    def move(source, target):  # epoch 1 published (5 files), epoch 2 committed and its best.safetensors published
        moves.append(target)
        if len(moves) == 5 + 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_move(source, target)

    epoch_commit.move = move
    fit(TrainConfig(**json.loads(sys.argv[1])))
""")


def test_a_real_sigkill_between_commit_and_publish_rolls_the_epoch_forward(small_dataset, tmp_path, monkeypatch, straight) -> None:
    """A real kill: no cleanup runs, the lock dies with the process, and the resume finishes publishing epoch 2."""
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    child = subprocess.run([sys.executable, "-c", KILL_ITSELF, json.dumps(vars(config(small_dataset)))],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert epoch_commit.read_manifest(run)["epoch"] == 2
    assert json.loads((run / "best.json").read_text())["epoch"] == 1  # still staged: best.* of two epochs on top
    assert (run / epoch_commit.STAGING / "best.json").is_file()
    assert json.loads((run / "last.json").read_text())["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    fit(config(small_dataset), resume=True)
    assert outcome(run)["files"] == straight["files"] and outcome(run)["log"] == straight["log"]
