"""CI is strict where a user's clone is lenient (issue 21): under PATCHSCOPE_REQUIRE_FIXTURES=1 (.ci/run) a test
skipped for a missing reference fixture fails instead; no test installs system packages (Chromium comes from
`make browser`, which `make test` runs only where PATCHSCOPE_INSTALL_BROWSER=1), and a missing browser is a skip
that names that target."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import browser
from tests.conftest import REQUIRE_FIXTURES, SHARED_FIXTURES, require_fixture

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="no make on this machine")


# ----------------------------------------------------------------------------- missing fixtures

def test_require_fixture_skips_in_a_clone_and_fails_under_the_variable(monkeypatch, tmp_path):
    missing = SHARED_FIXTURES / "no_such_fixture.pt"
    monkeypatch.delenv(REQUIRE_FIXTURES, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"reference fixture not found at .*no_such_fixture\.pt"):
        require_fixture(missing)
    monkeypatch.setenv(REQUIRE_FIXTURES, "1")
    with pytest.raises(pytest.fail.Exception, match=f"no_such_fixture.pt.*{REQUIRE_FIXTURES}=1"):
        require_fixture(missing)
    assert require_fixture(tmp_path) == tmp_path


@pytest.mark.parametrize("required", [False, True])
def test_every_kind_of_missing_fixture_skip_fails_under_the_variable(pytester, monkeypatch, required):
    """The skipif marks and pytest.skip calls the generator tests use today, through this suite's conftest hook."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403 - the hook and helpers\n")
    missing = SHARED_FIXTURES.parent / ".." / "shared" / "fixtures" / "generators" / "nothing_here"
    pytester.makepyfile(f"""
        import pytest
        from pathlib import Path
        from tests.conftest import needs_fixture, require_fixture

        MISSING = Path({str(missing)!r})

        @pytest.mark.skipif(not MISSING.is_dir(), reason=f"generator fixtures not found at {{MISSING}}")
        def test_marked():
            pass

        def test_called():
            if not MISSING.exists():
                pytest.skip(f"TF fixture not found at {{MISSING}}")

        @needs_fixture(MISSING)
        def test_helper_mark():
            pass

        def test_helper_call():
            require_fixture(MISSING)

        @pytest.mark.skipif(True, reason="needs FIFOs")
        def test_other_skip():
            pass
    """)
    if required:
        monkeypatch.setenv(REQUIRE_FIXTURES, "1")
    else:
        monkeypatch.delenv(REQUIRE_FIXTURES, raising=False)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    if required:  # setup-time skips become setup errors, call-time ones failures; other skips stay skips
        outcomes = result.parseoutcomes()
        assert outcomes.get("errors", 0) + outcomes.get("failed", 0) == 4 and outcomes.get("skipped") == 1
        result.stdout.fnmatch_lines([f"*{REQUIRE_FIXTURES}=1*"])
    else:
        result.assert_outcomes(skipped=5)
        result.stdout.fnmatch_lines(["*not found at*nothing_here*"])


def test_ci_run_sets_the_strict_variables_before_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    before_make = script[:re.search(r"^make test$", script, re.M).start()]
    assert re.search(rf"^export {REQUIRE_FIXTURES}=1$", before_make, re.M)
    assert re.search(r"^export PATCHSCOPE_INSTALL_BROWSER=1$", before_make, re.M)


# ----------------------------------------------------------------------------- the browser

PACKAGE_MANAGER = re.compile(r"""["'](apt-get|apt|dpkg|yum|dnf|apk|brew|snap)["']\s*,""")


def test_no_test_runs_a_package_manager():
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").rglob("*.py"))
                 if PACKAGE_MANAGER.search(path.read_text(encoding="utf-8"))]
    assert offenders == [], "system packages belong to a make target (make browser), not to a test"


def test_a_missing_chromium_is_a_skip_that_names_make_browser(monkeypatch):
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"a test ran {a[0]!r}"))
    with pytest.raises(pytest.skip.Exception, match=r"Chromium not found .*`make browser` installs it"):
        browser.chromium_or_skip()


@needs_make
@pytest.mark.parametrize("install", [None, "1"])
def test_make_test_runs_make_browser_only_where_asked(install):
    outer = ("PATCHSCOPE_INSTALL_BROWSER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")  # CI runs pytest inside make
    env = {k: v for k, v in os.environ.items() if k not in outer}
    if install:
        env["PATCHSCOPE_INSTALL_BROWSER"] = install
    for target in ("test", "test-fast"):
        plan = subprocess.run([MAKE, "-n", "-C", str(ROOT), target], capture_output=True, text=True, env=env,
                              check=True, timeout=60).stdout
        assert ("apt-get install" in plan) == bool(install), plan
        assert "pytest" in plan


@needs_make
def test_make_browser_says_why_it_cannot_install_and_fails(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with `id` but neither Chromium nor apt-get
    bin_dir.mkdir()
    (bin_dir / "id").symlink_to(shutil.which("id"))
    result = subprocess.run([MAKE, "-C", str(ROOT), "browser"], capture_output=True, text=True, timeout=60,
                            env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "cannot install chromium: it takes root and apt-get" in result.stderr
