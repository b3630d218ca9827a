"""The demo's stage book: finished stages are skipped, unfinished ones resumed, changed ones redone with
everything downstream of them, and nothing else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchscope.analysis.demo import DemoConfig, load_demo_config, with_quick
from patchscope.analysis.demo_stages import BOOK_FILE, StageBook
from patchscope.common.errors import InputError


class Calls:
    def __init__(self) -> None:
        self.log: list[tuple[str, bool]] = []

    def work(self, name: str, folder):
        def run(resume: bool) -> dict:
            self.log.append((name, resume))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.txt").write_text(name)
            return {"name": name}
        return run


def _pipeline(out, calls: Calls, a_setting: int, b_setting: int) -> None:
    book = StageBook(out)
    book.run("a", out / "a", {"x": a_setting}, [], calls.work("a", out / "a"), lambda s: s["name"])
    book.run("b", out / "b", {"y": b_setting}, ["a"], calls.work("b", out / "b"), lambda s: s["name"])
    book.run("c", out / "c", {}, [], calls.work("c", out / "c"), lambda s: s["name"])


def _chain(out, calls: Calls, a_setting: int) -> None:
    """a -> b -> c, each reading the one before."""
    book = StageBook(out)
    book.run("a", out / "a", {"x": a_setting}, [], calls.work("a", out / "a"), str)
    book.run("b", out / "b", {}, ["a"], calls.work("b", out / "b"), str)
    book.run("c", out / "c", {}, ["b"], calls.work("c", out / "c"), str)


def test_finished_stages_are_skipped_and_say_so(tmp_path, capsys):
    calls = Calls()
    _pipeline(tmp_path, calls, 1, 1)
    _pipeline(tmp_path, calls, 1, 1)
    assert calls.log == [("a", False), ("b", False), ("c", False)]
    assert capsys.readouterr().out.count("(cached)") == 3


def test_a_changed_setting_redoes_its_stage_and_those_downstream_only(tmp_path):
    calls = Calls()
    _pipeline(tmp_path, calls, 1, 1)
    (tmp_path / "a" / "stale.txt").write_text("from the old settings")
    calls.log.clear()
    _pipeline(tmp_path, calls, 2, 1)
    assert calls.log == [("a", False), ("b", False)]  # c does not read a
    assert not (tmp_path / "a" / "stale.txt").exists()  # a redone stage starts from an empty folder
    calls.log.clear()
    _pipeline(tmp_path, calls, 2, 3)
    assert calls.log == [("b", False)]


def test_a_downstream_result_is_never_paired_with_another_run_of_its_inputs(tmp_path):
    """a(1) finishes everything; a(2) is redone but b is interrupted; back to a(1): a is redone, so b and c
    must be too, although their settings and a's settings are those of the first run."""
    calls = Calls()
    _chain(tmp_path, calls, 1)
    book = StageBook(tmp_path)
    book.run("a", tmp_path / "a", {"x": 2}, [], calls.work("a", tmp_path / "a"), str)

    def interrupted(resume: bool) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        book.run("b", tmp_path / "b", {}, ["a"], interrupted, str)
    calls.log.clear()
    _chain(tmp_path, calls, 1)
    assert calls.log == [("a", False), ("b", False), ("c", False)]


def test_an_interrupted_stage_resumes_in_its_folder(tmp_path):
    calls = Calls()
    book = StageBook(tmp_path)

    def interrupted(resume: bool) -> dict:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "partial.txt").write_text("half done")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        book.run("a", tmp_path / "a", {"x": 1}, [], interrupted, str)
    assert json.loads((tmp_path / BOOK_FILE).read_text())["a"]["done"] is False
    StageBook(tmp_path).run("a", tmp_path / "a", {"x": 1}, [], calls.work("a", tmp_path / "a"), str)
    assert calls.log == [("a", True)] and (tmp_path / "a" / "partial.txt").exists()


def test_an_unreadable_book_only_costs_recomputation(tmp_path):
    (tmp_path / BOOK_FILE).write_text("{not json")
    calls = Calls()
    _pipeline(tmp_path, calls, 1, 1)
    assert [name for name, _ in calls.log] == ["a", "b", "c"]


def test_quick_overrides_merge_mappings_key_by_key():
    cfg = DemoConfig(train={"model": "xception_block1", "max_epochs": 10}, counts={"train": 10, "test": 5},
                     quick={"train": {"max_epochs": 2}, "patches": 7})
    quick = with_quick(cfg)
    assert quick.train == {"model": "xception_block1", "max_epochs": 2}
    assert quick.counts == {"train": 10, "test": 5} and quick.patches == 7 and quick.quick == {}


def test_a_user_config_updates_the_default_one_key_by_key_at_every_depth(tmp_path):
    (tmp_path / "mine.yaml").write_text("train: {max-epochs: 3}\nfinetune: {steps: 7}\nquick: {finetune: {steps: 2}}\n")
    default, mine = load_demo_config(), load_demo_config(tmp_path / "mine.yaml")
    assert mine.train == {**default.train, "max_epochs": 3}
    assert mine.finetune == {**default.finetune, "steps": 7} and mine.exaggerate == default.exaggerate
    assert mine.quick["finetune"] == {**default.quick["finetune"], "steps": 2}  # not the whole quick block
    quick = load_demo_config(tmp_path / "mine.yaml", quick=True)
    assert quick.finetune == {**default.finetune, **default.quick["finetune"], "steps": 2}
    assert quick.counts == default.quick["counts"] and quick.train["max_epochs"] == default.quick["train"]["max_epochs"]


def test_an_unknown_setting_is_an_input_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\n")
    with pytest.raises(InputError, match="epochs"):
        load_demo_config(tmp_path / "bad.yaml")


def test_stage_keys_do_not_depend_on_where_the_demo_folder_or_the_generator_is(tmp_path, monkeypatch):
    from patchscope.analysis.demo import BUNDLED_GENERATOR, Demo

    monkeypatch.chdir(tmp_path)
    here = Demo(DemoConfig(), Path("run"))._portable(
        {"out": "run/classifier", "nested": {"fake": "run/fakes"}, "generator": str(BUNDLED_GENERATOR), "lr": 1})
    moved = Demo(DemoConfig(), tmp_path / "elsewhere")._portable(
        {"out": str(tmp_path / "elsewhere" / "classifier"), "nested": {"fake": str(tmp_path / "elsewhere" / "fakes")},
         "generator": str(BUNDLED_GENERATOR), "lr": 1})
    assert here == moved == {"out": "<out>/classifier", "nested": {"fake": "<out>/fakes"}, "generator": "<generator>",
                             "lr": 1}
