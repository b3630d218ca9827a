"""`finetune` killed at every write of a run (its record, its sources, each log line, each step of a checkpoint's
commit, its tables): `--resume` continues, and in fp32 on CPU ends with the files of an uninterrupted run, byte for
byte. A checkpoint changed by hand is refused; a run an earlier version left half-saved (generator.pt newer than
resume.pt, no commit) resumes from its resume.pt."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune
import patchscope.attacks.finetune as finetune_module
from patchscope.cli import main
from patchscope.common import atomic, runfolder
from patchscope.common.errors import InputError
from patchscope.forensics import epoch_commit
from patchscope.forensics.checkpoint import save_classifier
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.pgan.zoo import save_pgan_zoo
from tests.attacks.test_finetune import detector
from tests.tiny_models import RESOLUTION, tiny_pgan

STEPS, CHECKPOINT_EVERY, LOG_EVERY = 4, 2, 2
COMMIT = [("write", "generator.pt"), ("write", "resume.pt"), ("write", "checkpoint.json"), ("move", "generator.pt"),
          ("move", "resume.pt"), ("remove_tree", ".staged")]
# Every write of the run below, in order: its record and sources, log lines at steps 0, 2 and 4, the commits of
# the checkpoints at steps 2 and 4 (staged, committed by the manifest, published), then the tables and the grid.
OPS = ([("write", "config.yaml"), ("write", "sources.json"), ("append", "metrics.jsonl"), ("append", "metrics.jsonl")]
       + COMMIT + [("append", "metrics.jsonl")] + COMMIT
       + [("write", "before_after.json"), ("write", "before_after.csv"), ("write", "grid.png")])


class Killed(BaseException):
    """The process dying at a chosen moment: no `except Exception` on the way may catch it."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from patchscope.forensics.builtin_images import builtin_photos, random_crops

    root = tmp_path_factory.mktemp("finetune_faults")
    (root / "real").mkdir()
    for i, crop in enumerate(random_crops(builtin_photos(), 16, RESOLUTION, seed=0)):
        Image.fromarray(crop).save(root / "real" / f"{i:03d}.png")
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, root / "pgan.pt", discriminator=discriminator)
    save_classifier(root / "classifier" / "best", detector(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    return {"generator": root / "pgan.pt", "classifier": root / "classifier", "real": root / "real"}


def config(sources: dict[str, Path], **changes) -> FinetuneConfig:
    """The run "run" in the current folder: every run records the same settings, byte for byte."""
    settings = dict(generator=str(sources["generator"]), classifier=str(sources["classifier"]),
                    real=str(sources["real"]), out="run", steps=STEPS, batch_size=4, classifier_weight=10.0,
                    ema_beta=0.5, checkpoint_every=CHECKPOINT_EVERY, log_every=LOG_EVERY, eval_n=4, compare_n=4,
                    grid_rows=2, lpips_random=True, device="cpu", precision="fp32")
    return FinetuneConfig(**{**settings, **changes})


def outcome(run: Path) -> dict[str, bytes]:
    """Every file a run leaves, but for its lock."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file() and p.name != runfolder.LOCK_FILE}


def generator_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_torch(path)
    return {name: checkpoint[name] for name in ("netG", "netD", "avgG")}


@pytest.fixture(scope="module")
def straight(sources, tmp_path_factory) -> Path:
    """The uninterrupted run's folder."""
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run_finetune(config(sources))
        runfolder.release("run")
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]
    return folder / "run"


def assert_same_run(run: Path, straight: Path) -> None:
    """The generator's tensors, the log, and then every file byte for byte; no staging folder or temporary file."""
    finetuned, expected = generator_states(run / "generator.pt"), generator_states(straight / "generator.pt")
    for name in expected:
        assert finetuned[name].keys() == expected[name].keys()
        for key, value in expected[name].items():
            assert torch.equal(finetuned[name][key], value), (name, key)
    assert (run / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    result, reference = outcome(run), outcome(straight)
    assert result.keys() == reference.keys()
    for name, contents in reference.items():
        assert result[name] == contents, f"{name} differs"
    assert not [p.name for p in run.iterdir() if p.is_dir() or p.name.endswith(".tmp")]


def instrument(monkeypatch, kill_at: int | None = None) -> list[tuple[str, str]]:
    """Count every write of a run as (operation, file name); with `kill_at`, raise Killed instead of doing that one,
    leaving what a kill inside it leaves: a torn temporary file beside an atomic write's target, half a log line."""
    done: list[tuple[str, str]] = []

    def due(op: str, path) -> bool:
        if len(done) == kill_at:
            return True
        done.append((op, Path(path).name))
        return False

    real_open = atomic.atomic_open

    @contextlib.contextmanager
    def atomic_open(path, mode="w"):
        if due("write", path):
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / f".{target.name}.torn01.tmp").write_bytes(b"half a fi")
            raise Killed(f"in the write of {target.name}")
        with real_open(path, mode) as handle:
            yield handle

    real_append = finetune_module.append_line

    def append_line(path, line):
        if due("append", path):
            with open(path, "a") as handle:
                handle.write(line[:len(line) // 2])
            raise Killed(f"in a line of {Path(path).name}")
        real_append(path, line)

    def wrap(op, real):
        def operation(*args):
            if due(op, args[-1] if op == "move" else args[0]):
                raise Killed(f"before {op} {Path(args[0]).name}")
            return real(*args)
        return operation

    monkeypatch.setattr(atomic, "atomic_open", atomic_open)
    monkeypatch.setattr(finetune_module, "append_line", append_line)
    for name in ("move", "remove_tree"):
        monkeypatch.setattr(epoch_commit, name, wrap(name, getattr(epoch_commit, name)))
    return done


def test_a_run_writes_its_record_first_and_each_checkpoint_as_one_commit(sources, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        ops = instrument(patch)
        run_finetune(config(sources))
    runfolder.release("run")
    assert ops == OPS


@pytest.mark.parametrize("kill_at", range(len(OPS)), ids=[f"{i:02d}-{op}-{name}" for i, (op, name) in enumerate(OPS)])
def test_a_kill_at_any_write_resumes_to_the_files_of_an_uninterrupted_run(sources, tmp_path, monkeypatch, straight,
                                                                          kill_at) -> None:
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        instrument(patch, kill_at)
        with pytest.raises(Killed):
            run_finetune(config(sources))
    runfolder.release("run")  # what the process's death does
    summary = run_finetune(config(sources), resume=True)
    runfolder.release("run")
    assert summary["steps"] == STEPS and summary["stopped"] is None
    assert_same_run(tmp_path / "run", straight)



KILL_ITSELF = textwrap.dedent("""
    import contextlib, json, os, signal, sys
    from pathlib import Path
    import torch
    from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune
    from patchscope.common import atomic
    from patchscope.forensics import epoch_commit

    torch.set_num_threads(1)  # as the tests' own process: the same sums in the same order
    moment = sys.argv[2]
    real_open, real_move = atomic.atomic_open, epoch_commit.move

    @contextlib.contextmanager
    def atomic_open(path, mode="w"):
        if Path(path).name == moment:  # the file before it is written, this one is not
            os.kill(os.getpid(), signal.SIGKILL)
        with real_open(path, mode) as handle:
            yield handle

    def move(source, target):  # the first checkpoint committed, none of its files published
        if moment == "publish":
            os.kill(os.getpid(), signal.SIGKILL)
        real_move(source, target)

    atomic.atomic_open, epoch_commit.move = atomic_open, move
    run_finetune(FinetuneConfig(**json.loads(sys.argv[1])))
""")


@pytest.mark.parametrize("moment", ["sources.json", "publish"])
def test_a_real_sigkill_then_the_resume_command_ends_as_an_uninterrupted_run(sources, tmp_path, monkeypatch, straight,
                                                                             moment) -> None:
    """Killed for real (no cleanup runs, the lock dies with the process) between the run's two setup files (the
    moment of the original report: sources.json came first then, and --resume refused the folder with exit code 2),
    or right after a checkpoint's commit, before its files are moved into place; `finetune --resume` finishes it."""
    monkeypatch.chdir(tmp_path)
    settings = vars(config(sources))
    child = subprocess.run([sys.executable, "-c", KILL_ITSELF, json.dumps(settings), moment],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and not (run / "generator.pt").exists()
    assert (run / epoch_commit.MANIFEST).is_file() == (moment == "publish")
    result = CliRunner().invoke(main, ["finetune", "--config", "run/config.yaml", "--resume"])
    runfolder.release("run")
    assert result.exit_code == 0, result.output
    assert_same_run(run, straight)


def test_a_checkpoint_changed_after_its_commit_is_refused_in_one_line(sources, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_finetune(config(sources, steps=2, log_every=0, grid_rows=0))
    runfolder.release("run")
    generator = tmp_path / "run" / "generator.pt"
    generator.write_bytes(generator.read_bytes()[:-8])
    with pytest.raises(InputError, match=r"generator\.pt: not the file checkpoint\.json committed for step 2 "
                                         r"\(changed or damaged since\); the run cannot be continued"):
        run_finetune(config(sources, steps=4, log_every=0, grid_rows=0), resume=True)
    runfolder.release("run")


def test_a_run_an_earlier_version_left_half_saved_resumes_from_its_resume_state(sources, tmp_path, monkeypatch,
                                                                              straight) -> None:
    """Before commits, generator.pt was written before resume.pt: killed between the two at step 4, the folder
    holds step 4's generator.pt, step 2's resume.pt, a log line of step 4 and no checkpoint.json. The resume
    continues from resume.pt, drops the line and ends as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        instrument(patch, kill_at=OPS.index(("write", "generator.pt"), OPS.index(("append", "metrics.jsonl"), 10)))
        with pytest.raises(Killed):
            run_finetune(config(sources))
    runfolder.release("run")
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 2, 4]
    (run / epoch_commit.MANIFEST).unlink()
    shutil.rmtree(run / epoch_commit.STAGING)
    shutil.copyfile(straight / "generator.pt", run / "generator.pt")
    assert torch.load(run / "resume.pt", weights_only=True)["step"] == 2
    run_finetune(config(sources), resume=True)
    runfolder.release("run")
    assert_same_run(run, straight)
