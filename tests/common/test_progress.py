"""Progress: a tqdm bar on a terminal; elsewhere one log line per interval with counts, rate and eta."""
from __future__ import annotations

import io
import logging

import pytest
import torch
from tqdm import tqdm

from patchscope.common import progress as progress_module
from patchscope.common.progress import LoggedProgress, progress_bar

LOGGER = "patchscope.progress"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_without_a_terminal_one_line_is_logged_per_interval_with_counts_rate_and_eta(not_a_terminal, lines):
    clock = FakeClock()
    bar = progress_bar(total=5000, desc="train epoch 3", unit="img", interval=30, clock=clock)
    assert isinstance(bar, LoggedProgress)
    for now in (10, 20, 29.9):  # nothing before the interval has passed
        clock.now = now
        bar.update(400)
    assert lines() == []
    clock.now = 30
    bar.update(400)  # 1600 images in 30 s: 53.3 img/s, 3400 left: 64 s
    assert lines() == ["train epoch 3: 1600/5000 img (32%), 53.3 img/s, eta 1m04s"]
    clock.now = 45
    bar.update(400)
    assert len(lines()) == 1  # 15 s since the last line
    clock.now = 60
    bar.update(400)
    assert len(lines()) == 2 and lines()[1].startswith("train epoch 3: 2400/5000 img (48%), 40 img/s, eta ")


def test_interval_zero_logs_every_step_of_an_iteration_and_takes_the_total_from_len(not_a_terminal, lines):
    clock = FakeClock()
    items = []
    for item in progress_bar(["a", "b", "c", "d"], desc="scoring", unit="batch", interval=0, clock=clock):
        clock.now += 2
        items.append(item)
    assert items == ["a", "b", "c", "d"]
    assert lines() == ["scoring: 1/4 batch (25%), 0.5 batch/s, eta 6s",
                       "scoring: 2/4 batch (50%), 0.5 batch/s, eta 4s",
                       "scoring: 3/4 batch (75%), 0.5 batch/s, eta 2s",
                       "scoring: 4/4 batch (100%), 0.5 batch/s"]


def test_the_module_interval_is_the_default_so_tests_can_shorten_it(not_a_terminal, lines, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    bar = progress_bar(total=3, desc="sample train", unit="img", initial=1)
    bar.update(1)
    assert len(lines()) == 1 and lines()[0].startswith("sample train: 2/3 img (67%)")


def test_an_unknown_total_resumed_count_and_postfix_are_shown(not_a_terminal, lines):
    clock = FakeClock()
    with progress_bar(iter(range(10)), desc="finetune", unit="step", initial=100, interval=0, clock=clock) as bar:
        clock.now = 4
        bar.set_postfix(loss_d="0.123", refresh=False)
        bar.update(2)  # the rate counts this session's steps, not the resumed ones
    assert lines() == ["finetune: 102 step, 0.5 step/s, loss_d=0.123"]


def test_close_adds_a_last_line_only_after_earlier_ones(not_a_terminal, lines):
    clock = FakeClock()
    with progress_bar(total=10, desc="quick", interval=30, clock=clock) as bar:
        bar.update(10)
    assert lines() == []  # a loop shorter than the interval stays silent
    with progress_bar(total=10, desc="slow", interval=30, clock=clock) as bar:
        clock.now = 31
        bar.update(3)
        clock.now = 40
        bar.update(7)
    assert [line.split(":")[1].split(",")[0] for line in lines()] == [" 3/10 it (30%)", " 10/10 it (100%)"]


def test_disabled_progress_logs_nothing(not_a_terminal, lines):
    bar = progress_bar(range(3), total=3, desc="off", disable=True, interval=0)
    assert list(bar) == [0, 1, 2] and lines() == []


def test_a_terminal_gets_a_tqdm_bar(monkeypatch, lines):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress_bar(total=4, desc="drawn", unit="img", interval=0)
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "drawn" in terminal.getvalue() and "2/4" in terminal.getvalue()
    assert lines() == []


def test_library_loops_use_it(not_a_terminal, lines, monkeypatch):
    """forensics.evaluate.predict reports its batches through the helper, not a silent tqdm."""
    from patchscope.forensics.evaluate import predict

    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    model = torch.nn.Conv2d(3, 2, 1)
    batches = [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), None) for _ in range(3)]
    predict(model, batches, torch.device("cpu"))
    assert [line.split(",")[0] for line in lines()] == [f"scoring: {i}/3 batch ({p}%)"
                                                        for i, p in ((1, 33), (2, 67), (3, 100))]
