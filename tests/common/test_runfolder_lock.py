"""A run folder in use is locked: a second process (train --resume, another demo, any RunFolder command) is refused
in one line while the first works there, and accepted once it has exited, however it ended."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common import runfolder
from patchscope.common.errors import InputError
from patchscope.common.runfolder import LOCK_FILE, RECORD, RunFolder, other_entries

RULE = RunFolder(holds="a study", resumable=("steps",), force_to="start again")

# Holds a folder the way every command does, says so, and keeps it until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    from patchscope.common import runfolder
    from patchscope.common.runfolder import RunFolder

    if sys.argv[2] == "claim":
        RunFolder(holds="a study", resumable=("steps",), force_to="start again").claim(
            sys.argv[1], {"steps": 1}, resume=True)
    else:
        runfolder.hold(sys.argv[1])
    print("holding", flush=True)
    sys.stdin.read()
""")

# A real training run that stops after its first epoch's save until its stdin has a line.
TRAINER = textwrap.dedent("""
    import json, sys
    import torch
    from patchscope.forensics.train import TrainConfig, fit

    torch.set_num_threads(1)

    def wait(record):
        if record["epoch"] == 1:
            print("epoch 1 saved", flush=True)
            sys.stdin.readline()

    fit(TrainConfig(**json.loads(sys.argv[1])), on_epoch_end=wait)
""")


def start(script: str, *args: object) -> subprocess.Popen:
    """Start `script` in a new process and wait until it says it holds the folder."""
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = process.stdout.readline()
    assert said.strip(), f"the holder stopped before holding the folder: {process.communicate()[1]}"
    return process


def finish(process: subprocess.Popen) -> None:
    process.stdin.close()
    assert process.wait(timeout=120) == 0, process.stderr.read()


def in_use(folder: Path, process: subprocess.Popen) -> str:
    return (f"{folder}: in use by another patchscope process (pid {process.pid}); "
            f"wait for it or choose another --out")


def test_a_second_process_is_refused_while_the_first_holds_the_folder_and_accepted_after(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = start(HOLDER, folder, "claim")
    try:
        for resume, force in ((True, False), (False, False), (False, True)):  # whatever it asks, the folder is busy
            with pytest.raises(InputError) as refused:
                RULE.check(folder, {"steps": 1}, resume=resume, force=force)
            assert str(refused.value) == in_use(folder, holder)
        assert (folder / RECORD).is_file()  # nothing of the holder's was touched
    finally:
        finish(holder)
    assert RULE.claim(folder, {"steps": 2}, resume=True) == folder
    runfolder.release(folder)


def test_a_folder_new_at_check_is_held_by_save_unless_another_run_took_it_meanwhile(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    assert RULE.check(folder, {"steps": 1}, resume=False) == folder
    assert not folder.exists()  # a command refused for other reasons after its check leaves nothing behind
    holder = start(HOLDER, folder, "claim")  # another run starts there meanwhile
    try:
        with pytest.raises(InputError) as refused:
            RULE.save(folder, {"steps": 1})
        assert str(refused.value) == in_use(folder, holder)
    finally:
        finish(holder)
    with pytest.raises(InputError, match=r"run: was claimed by another patchscope process meanwhile; choose another"):
        RULE.save(folder, {"steps": 1})
    assert not runfolder.holds(folder)


def test_a_killed_holder_frees_the_folder(tmp_path: Path) -> None:
    holder = start(HOLDER, tmp_path, "hold")
    with pytest.raises(InputError, match="in use by another patchscope process"):
        runfolder.hold(tmp_path)
    holder.kill()
    assert holder.wait(timeout=60) == -signal.SIGKILL
    runfolder.hold(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    runfolder.release(tmp_path)


def test_train_resume_is_refused_while_the_same_run_trains_and_accepted_once_it_ended(builtin_dataset,
                                                                                       tmp_path: Path) -> None:
    """Issue 22 #8: both trained side by side and metrics.jsonl ended with 54 lines for 30 epochs."""
    out = tmp_path / "run"
    settings = dict(real=str(builtin_dataset / "real"), fake=str(builtin_dataset / "fake"), out=str(out),
                    model="xception_block1", load_size=32, crop_size=32, batch_size=16, max_epochs=2,
                    device="cpu", precision="fp32")
    trainer = start(TRAINER, json.dumps(settings))
    try:
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
        second = CliRunner().invoke(main, ["train", *flags, "--resume", "--max-epochs=3"])
        assert second.exit_code == 2
        assert second.output.strip() == f"error: {in_use(out, trainer)}"
    finally:
        trainer.stdin.write("\n")
        trainer.stdin.flush()
        finish(trainer)
    third = CliRunner().invoke(main, ["train", *flags, "--resume", "--max-epochs=3"])
    assert third.exit_code == 0, third.output
    lines = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3]  # finished at max_epochs=2 in the first process; the resume adds epoch 3 once


@pytest.mark.parametrize("force", [False, True])
def test_a_second_demo_into_a_folder_in_use_is_refused_before_touching_it(tmp_path: Path, force: bool) -> None:
    """Issue 21: two demos into one folder crashed (OSError: Directory not empty, from --force's rmtree)."""
    (tmp_path / "stages.json").write_text("{}")
    holder = start(HOLDER, tmp_path, "hold")
    try:
        second = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--quick", *(["--force"] if force else [])])
        assert second.exit_code == 2
        assert second.output.strip() == f"error: {in_use(tmp_path, holder)}"
        assert (tmp_path / "stages.json").read_text() == "{}"
    finally:
        finish(holder)


def test_holds_nest_within_a_process_and_the_last_release_frees_the_folder(tmp_path: Path) -> None:
    probe = textwrap.dedent("""
        import sys
        from patchscope.common import runfolder
        from patchscope.common.errors import InputError
        try:
            runfolder.hold(sys.argv[1])
            print("free")
        except InputError:
            print("busy")
    """)

    def seen_from_another_process() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    runfolder.hold(tmp_path)
    RULE.claim(tmp_path, {"steps": 1}, resume=False)  # the same process claims what it holds
    runfolder.release(tmp_path)
    assert seen_from_another_process() == "busy"
    runfolder.release(tmp_path)
    assert seen_from_another_process() == "free"


def test_the_lock_file_is_never_someone_elses_file_and_force_keeps_it(tmp_path: Path) -> None:
    runfolder.hold(tmp_path)
    runfolder.release(tmp_path)
    assert other_entries(tmp_path) == []
    RULE.claim(tmp_path, {"steps": 1}, resume=False)  # a folder holding only the lock file is an empty folder
    (tmp_path / "results").mkdir()
    runfolder.clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]
    runfolder.release(tmp_path)


def test_a_refused_foreign_folder_gets_no_lock_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a study folder"):
        RULE.check(tmp_path, {"steps": 1}, resume=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_folder_emptied_under_a_hold_is_locked_again_when_claimed(tmp_path: Path) -> None:
    """The demo redoes a stage by deleting its folder; the process's next claim must lock the new lock file."""
    folder = tmp_path / "stage"
    RULE.claim(folder, {"steps": 1}, resume=False)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    RULE.claim(folder, {"steps": 1}, resume=False)
    holder = subprocess.run([sys.executable, "-c", HOLDER, str(folder), "hold"], input="", capture_output=True,
                            text=True, timeout=60)
    assert "in use by another patchscope process" in holder.stderr
    runfolder.release(folder)


def test_without_fcntl_folders_are_used_unlocked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runfolder, "fcntl", None)
    assert RULE.claim(tmp_path / "run", {"steps": 1}, resume=False) == tmp_path / "run"
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    runfolder.release(tmp_path / "run")
