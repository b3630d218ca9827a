"""Shared test fixtures: the reference fixture folder, the missing-fixture policy, a small built-in dataset.

Missing reference fixtures: a user's clone has no ../shared, so a test that needs one of its files skips and
says where the file was looked for. CI checks out ../shared beside the repository, and there a missing fixture
is a fault, not a reason to skip: `.ci/run` sets PATCHSCOPE_REQUIRE_FIXTURES=1, which turns every such skip
into a failure. `require_fixture` / `needs_fixture` are the helpers a test uses; the report hook below applies
the policy to every skip whose reason names a path under the fixture folder, whichever way it was raised.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
REQUIRE_FIXTURES = "PATCHSCOPE_REQUIRE_FIXTURES"  # set to 1 by .ci/run
_FIXTURE_FOLDER_NAME = "shared/fixtures"  # how a missing-fixture skip reason names the folder

# The suite runs as two pytest-xdist workers on CI's two cores; the tensors are tiny, so a
# second intra-op thread per worker would only add synchronisation.
torch.set_num_threads(1)


def fixtures_required() -> bool:
    """Whether a missing reference fixture fails the test (CI) instead of skipping it (a user's clone)."""
    return os.environ.get(REQUIRE_FIXTURES, "").strip() not in ("", "0")


def missing_fixture_reason(path: Path, what: str = "reference fixture") -> str:
    return f"{what} not found at {path} (the fixtures live in ../{_FIXTURE_FOLDER_NAME} beside a CI checkout)"


def require_fixture(path: Path, what: str = "reference fixture") -> Path:
    """`path` when it exists; else the calling test skips saying where it looked (fails under the variable)."""
    path = Path(path)
    if not path.exists():
        reason = missing_fixture_reason(path, what)
        if fixtures_required():
            pytest.fail(f"{reason}; {REQUIRE_FIXTURES}=1 makes a missing fixture a failure", pytrace=False)
        pytest.skip(reason)
    return path


def needs_fixture(path: Path, what: str = "reference fixture") -> pytest.MarkDecorator:
    """A skipif mark for a test or module that needs `path` (the report hook fails it under the variable)."""
    return pytest.mark.skipif(not Path(path).exists(), reason=missing_fixture_reason(Path(path), what))


def is_missing_fixture_skip(reason: str) -> bool:
    """A skip reason that says a file under the reference fixture folder was not found."""
    text = reason.replace("\\", "/")
    return _FIXTURE_FOLDER_NAME in text and "not found" in text


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under PATCHSCOPE_REQUIRE_FIXTURES=1, a test skipped for a missing reference fixture is reported failed."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and fixtures_required():
        reason = _skip_reason(report)
        if is_missing_fixture_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"{reason}\n{REQUIRE_FIXTURES}=1 (set by .ci/run): a missing reference fixture fails"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    return require_fixture(SHARED_FIXTURES, "reference fixtures")


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory) -> Path:
    """Real crops and resampled fakes, 32 px: train 96, val 32, test 48 of each."""
    from patchscope.forensics.builtin_images import write_builtin_dataset

    return write_builtin_dataset(tmp_path_factory.mktemp("builtin"), {"train": 96, "val": 32, "test": 48},
                                 size=32, seed=0)
