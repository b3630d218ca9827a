"""The run-folder rule (common.runfolder): every branch of `RunFolder.check`, the settings comparison, and
two real commands (train, exaggerate) that give the same answers through the command line."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common.config import read_yaml
from patchscope.common.errors import InputError
from patchscope.common.runfolder import LOCK_FILE, RECORD, RunFolder, changed_settings, other_entries, refuse_changes

LEFTOVER = ".config.yaml.k2x9q1.tmp"  # what a crash inside atomic_open("config.yaml") leaves behind


@dataclass
class Settings:
    lr: float = 0.001
    steps: int = 10
    device: str = "cpu"
    ks: tuple = (-1.0, 1.0)
    train: dict = field(default_factory=lambda: {"model": "xb1", "workers": 0})


RULE = RunFolder(holds="a study", resumable=("steps", "device", "train.workers"), resume_to="continue it",
                 force_to="start again", writes=("metrics.jsonl", "results"))
NO_FORCE = RunFolder(holds="a study", resumable=("steps",), force_to=None)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A folder holding a run of the study with the default settings."""
    return RULE.claim(tmp_path / "run", Settings(), resume=False)


# ----------------------------------------------------------------------------- accepted

def test_a_new_folder_is_accepted_and_claim_writes_the_settings_record(tmp_path: Path) -> None:
    out = RULE.claim(tmp_path / "new" / "run", Settings(lr=0.01), resume=False)
    assert out == tmp_path / "new" / "run"
    assert read_yaml(out / RECORD) == {"lr": 0.01, "steps": 10, "device": "cpu", "ks": [-1.0, 1.0],
                                       "train": {"model": "xb1", "workers": 0}}


def test_an_empty_folder_is_accepted_with_or_without_resume(tmp_path: Path) -> None:
    assert RULE.check(tmp_path, Settings(), resume=False) == tmp_path
    assert RULE.check(tmp_path, Settings(), resume=True) == tmp_path
    assert not (tmp_path / RECORD).exists()  # check alone writes nothing


def test_resume_with_the_same_settings_is_accepted(run: Path) -> None:
    assert RULE.claim(run, Settings(), resume=True) == run


def test_resume_may_change_the_resumable_settings_nested_ones_included(run: Path) -> None:
    changed = Settings(steps=20, device="cuda", train={"model": "xb1", "workers": 4})
    RULE.claim(run, changed, resume=True)
    assert read_yaml(run / RECORD)["steps"] == 20 and read_yaml(run / RECORD)["train"]["workers"] == 4


def test_force_accepts_a_run_with_other_settings_without_resume(run: Path) -> None:
    RULE.claim(run, Settings(lr=0.5), resume=False, force=True)
    assert read_yaml(run / RECORD)["lr"] == 0.5


def test_force_starts_over_in_a_folder_killed_before_its_record(tmp_path: Path) -> None:
    """A run killed after writing some results but before config.yaml is never stuck: --force claims it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "results").mkdir()
    (tmp_path / LEFTOVER).write_text("")
    for resume in (False, True):
        with pytest.raises(InputError) as refused:
            RULE.check(tmp_path, Settings(), resume=resume)
        assert str(refused.value) == (f"{tmp_path}: holds a study cut short before its config.yaml (metrics.jsonl "
                                      f"and 1 more); pass --force to start again or choose another --out")
    RULE.claim(tmp_path, Settings(), resume=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RECORD, "metrics.jsonl", "results"]


def test_force_starts_over_when_the_record_is_unreadable(run: Path) -> None:
    (run / RECORD).write_text("lr: [unclosed\n")
    with pytest.raises(InputError, match=r"config\.yaml: not valid YAML .*; pass --force to start again"):
        RULE.check(run, Settings(), resume=True)
    RULE.claim(run, Settings(), resume=False, force=True)
    assert read_yaml(run / RECORD)["lr"] == 0.001


# ----------------------------------------------------------------------------- refused

def test_a_folder_holding_other_files_is_refused_and_left_alone_even_with_force(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")  # a name the study writes does not make the others its own
    for resume, force in ((False, False), (True, False), (False, True)):
        with pytest.raises(InputError) as refused:
            RULE.check(tmp_path, Settings(), resume=resume, force=force)
        assert str(refused.value) == (f"{tmp_path}: is not a study folder (it holds notes.txt and 1 more and no "
                                      f"config.yaml); choose another --out")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / RECORD).exists()


def test_a_file_given_as_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("")
    with pytest.raises(InputError, match="is a file, not a folder"):
        RULE.check(tmp_path / "out", Settings(), resume=False, force=True)


def test_the_same_run_is_refused_without_resume(run: Path) -> None:
    with pytest.raises(InputError) as refused:
        RULE.check(run, Settings(), resume=False)
    assert str(refused.value) == (f"{run}: already holds a study; pass --resume to continue it, --force to start "
                                  f"again, or choose another --out")


def test_resume_with_changed_settings_names_each_and_its_saved_value(run: Path) -> None:
    with pytest.raises(InputError) as refused:
        RULE.check(run, Settings(lr=0.5, ks=(2.0,), steps=99), resume=True)
    assert str(refused.value) == (f"{run}: cannot resume with different lr, ks (saved: lr=0.001, ks=[-1.0, 1.0]); "
                                  f"pass --force to start again or choose another --out")
    assert read_yaml(run / RECORD)["lr"] == 0.001  # a refusal leaves the record as it was


def test_a_nested_setting_is_named_with_its_path(run: Path) -> None:
    with pytest.raises(InputError, match=re.escape("different train.model (saved: train.model='xb1')")):
        RULE.check(run, Settings(train={"model": "xb2", "workers": 0}), resume=True)


def test_a_record_of_another_kind_is_refused_even_with_force(tmp_path: Path) -> None:
    retrain = RunFolder(holds="a retrain", kind="patchscope-retrain")
    RunFolder(holds="a study").claim(tmp_path, {"kind": "patchscope-study", "lr": 1}, resume=False)
    for resume, force in ((True, False), (False, True)):
        with pytest.raises(InputError, match=r"config\.yaml: records a 'patchscope-study' run, not a retrain"):
            retrain.check(tmp_path, {"kind": "patchscope-retrain", "lr": 1}, resume=resume, force=force)
    retrain.claim(tmp_path / "mine", {"kind": "patchscope-retrain", "lr": 1}, resume=False)
    retrain.check(tmp_path / "mine", {"kind": "patchscope-retrain", "lr": 1}, resume=True)


def test_a_command_without_force_says_so_in_every_refusal(tmp_path: Path) -> None:
    out = NO_FORCE.claim(tmp_path / "run", Settings(), resume=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refusals = []
    for folder, settings, resume in ((tmp_path / "other", Settings(), False), (out, Settings(), False),
                                     (out, Settings(lr=0.5), True)):
        with pytest.raises(InputError) as refused:
            NO_FORCE.check(folder, settings, resume=resume)
        refusals.append(str(refused.value))
    assert refusals[0].endswith("choose another --out (this command has no --force)")
    assert refusals[1].endswith("pass --resume to continue it, or choose another --out (this command has no "
                                "--force: remove the folder to start again)")
    assert refusals[2].endswith("(saved: lr=0.001); choose another --out (this command has no --force: remove "
                                "the folder to start again)")
    assert not any("pass --force" in message for message in refusals)


# ----------------------------------------------------------------------------- leftovers of crashed writes

def test_leftover_temporary_files_do_not_make_a_folder_someone_elses_and_are_removed(tmp_path: Path) -> None:
    (tmp_path / LEFTOVER).write_text("half a config")
    (tmp_path / ".metrics.json.0a1b2c.tmp").write_text("{")
    assert other_entries(tmp_path) == []
    RULE.claim(tmp_path, Settings(), resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, RECORD]


def test_leftovers_beside_a_run_are_removed_when_it_resumes(run: Path) -> None:
    (run / ".resume.pt.x7y8z9.tmp").write_bytes(b"\0" * 10)
    RULE.check(run, Settings(), resume=True)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, RECORD]


def test_a_refused_command_leaves_the_temporary_files_of_the_run_in_the_folder(run: Path) -> None:
    """They may belong to a run still writing there: only a command that may write in the folder removes them."""
    (run / ".resume.pt.x7y8z9.tmp").write_bytes(b"\0")
    with pytest.raises(InputError, match="already holds"):
        RULE.check(run, Settings(), resume=False)
    assert (run / ".resume.pt.x7y8z9.tmp").exists()


def test_only_files_with_the_temporary_name_are_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".cache.tmp").mkdir()  # a folder, whatever its name, is someone's
    (tmp_path / "notes.tmp").write_text("")  # no leading dot: not an atomic write's
    assert [p.name for p in other_entries(tmp_path)] == [".cache.tmp", "notes.tmp"]


# ----------------------------------------------------------------------------- the settings comparison

def test_changed_settings_compares_what_the_record_reads_back() -> None:
    saved = {"ks": [1.0, 2.0], "lr": float("nan"), "counts": {"train": 4, "val": 2}, "dropped": 1}
    assert changed_settings(saved, {"ks": (1.0, 2.0), "lr": math.nan, "counts": {"train": 4, "val": 2}}) == []
    assert changed_settings(saved, {"ks": (1.0,), "counts": {"train": 4}, "new": 0}) == [
        "ks", "counts.val", "new"]  # a nested key that went away counts; a top-level one the record lacks does
    assert changed_settings(saved, {"counts": {"train": 8, "val": 2}}, resumable=("counts",)) == []


def test_refuse_changes_names_the_file_that_holds_the_saved_settings(tmp_path: Path) -> None:
    refuse_changes(tmp_path / "resume.pt", {"batch": 4, "format": "zoo"}, {"batch": 4, "format": "tf"},
                   resumable=("format",))
    with pytest.raises(InputError) as refused:
        refuse_changes(tmp_path / "resume.pt", {"batch": 4}, {"batch": 8})
    assert str(refused.value) == f"{tmp_path / 'resume.pt'}: cannot resume with different batch (saved: batch=4)"


# ----------------------------------------------------------------------------- two commands, one rule

def cli(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def train_args(dataset: Path, out: Path, *extra: str) -> list:
    return ["train", "--real", dataset / "real", "--fake", dataset / "fake", "--out", out, "--model",
            "xception_block1", "--load-size", "32", "--crop-size", "32", "--batch-size", "16", "--max-epochs", "1",
            "--device", "cpu", *extra]


@pytest.fixture()
def exaggerate_case(tmp_path: Path) -> dict:
    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.generators.pgan.zoo import save_pgan_zoo
    from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, tmp_path / "pgan.pt", discriminator=discriminator)
    save_classifier(tmp_path / "classifier" / "best", brightness_classifier(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    return {"generator": tmp_path / "pgan.pt", "classifier": tmp_path / "classifier"}


def exaggerate_args(case: dict, out: Path, *extra: str) -> list:
    return ["exaggerate", "--generator", case["generator"], "--classifier", case["classifier"], "--out", out,
            "--steps", "2", "--batch-size", "4", "--eval-n", "4", "--grid-rows", "0", "--lam", "0",
            "--device", "cpu", "--precision", "fp32", *extra]


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_train_and_exaggerate_refuse_a_folder_of_other_files_alike(builtin_dataset, exaggerate_case,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / LEFTOVER).write_text("")
    train = error_line(cli(*train_args(builtin_dataset, out)))
    exaggerate = error_line(cli(*exaggerate_args(exaggerate_case, out)))
    assert train == (f"{out}: is not a run folder (it holds notes.txt and no config.yaml); choose another --out "
                     f"(this command has no --force)")
    assert exaggerate == (f"{out}: is not an exaggeration folder (it holds notes.txt and no config.yaml); choose "
                          f"another --out")
    assert error_line(cli(*exaggerate_args(exaggerate_case, out, "--force"))) == exaggerate
    assert sorted(p.name for p in out.iterdir()) == [LEFTOVER, "notes.txt"]


def test_train_and_exaggerate_refuse_resume_and_accept_a_run_alike(builtin_dataset, exaggerate_case,
                                                                     tmp_path: Path) -> None:
    """A tiny real run of each: the second start is refused without --resume, a changed setting is refused
    naming its saved value, a resumable change is accepted; only exaggerate offers --force, which also
    claims a folder its run was killed in before config.yaml was written."""
    trained, exaggerated = tmp_path / "train", tmp_path / "exaggerate"
    (trained / LEFTOVER).parent.mkdir()
    (trained / LEFTOVER).write_text("")  # a crash inside the first write of an earlier attempt
    assert cli(*train_args(builtin_dataset, trained)).exit_code == 0
    assert cli(*exaggerate_args(exaggerate_case, exaggerated)).exit_code == 0
    assert not (trained / LEFTOVER).exists()

    assert error_line(cli(*train_args(builtin_dataset, trained))) == (
        f"{trained}: already holds a run; pass --resume to continue it, or choose another --out (this command has "
        f"no --force: remove the folder to start again)")
    assert error_line(cli(*exaggerate_args(exaggerate_case, exaggerated))) == (
        f"{exaggerated}: already holds an exaggeration; pass --resume to re-score its shift, --force to fit it "
        f"again, or choose another --out")

    assert error_line(cli(*train_args(builtin_dataset, trained, "--resume", "--lr", "0.5"))) == (
        f"{trained}: cannot resume with different lr (saved: lr=0.001); choose another --out (this command has no "
        f"--force: remove the folder to start again)")
    assert error_line(cli(*exaggerate_args(exaggerate_case, exaggerated, "--resume", "--lam", "0.5"))) == (
        f"{exaggerated}: cannot resume with different lam (saved: lam=0.0); pass --force to fit it again or choose "
        f"another --out")

    assert cli(*train_args(builtin_dataset, trained, "--resume", "--max-epochs", "2")).exit_code == 0
    assert cli(*exaggerate_args(exaggerate_case, exaggerated, "--resume", "--ks", "0,1")).exit_code == 0

    (exaggerated / RECORD).unlink()  # as if killed after its first results, before config.yaml
    assert error_line(cli(*exaggerate_args(exaggerate_case, exaggerated))).startswith(
        f"{exaggerated}: holds an exaggeration cut short before its config.yaml (metrics.csv and 4 more); "
        f"pass --force to fit it again")
    assert cli(*exaggerate_args(exaggerate_case, exaggerated, "--force")).exit_code == 0
    assert read_yaml(exaggerated / RECORD)["lam"] == 0.0


def test_a_setting_added_since_the_run_is_not_a_change_at_its_default():
    """A run recorded before a field existed resumes when the field keeps its default (the behaviour it had)."""
    from dataclasses import dataclass

    from patchscope.common.runfolder import changed_settings

    @dataclass
    class Settings:
        lr: float = 0.1
        augment: str = "none"
        sizes: list = None

    saved = {"lr": 0.1}
    assert changed_settings(saved, Settings()) == []
    assert changed_settings(saved, Settings(augment="blur_jpeg_0.1")) == ["augment"]
    assert changed_settings({"lr": 0.1, "augment": "none"}, Settings(augment="blur_jpeg_0.5")) == ["augment"]
    assert changed_settings({"lr": 0.2}, Settings()) == ["lr"]


def test_a_nested_setting_added_since_the_run_is_not_a_change_at_its_default():
    """Retrain records the training settings as a mapping under `train`: a field added to TrainConfig since the
    run, at its default, must not block its resume either."""
    from dataclasses import dataclass

    from patchscope.common.runfolder import changed_settings

    @dataclass
    class Inner:
        lr: float = 0.1
        augment: str = "none"

    saved = {"train": {"lr": 0.1}}
    assert changed_settings(saved, {"train": {"lr": 0.1, "augment": "none"}}) == ["train.augment"]
    assert changed_settings(saved, {"train": {"lr": 0.1, "augment": "none"}}, nested={"train": Inner}) == []
    assert changed_settings(saved, {"train": {"lr": 0.1, "augment": "jpeg"}}, nested={"train": Inner}) == ["train.augment"]
