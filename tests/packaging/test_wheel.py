"""The wheel: one top-level name (`patchscope`), every package folder and data file of the repository in
it and nothing else, the `patchscope` console script; installed in a fresh environment outside the
repository it imports from its own files and (slow) runs the demo end to end.

The wheel is built once per session from a copy of the working tree (pip builds in the source folder,
and two test sessions building in the repository at once would share its build/ folder), offline:
`--no-build-isolation` with the setuptools of the test environment (the `test` extra pins it).
"""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The folders that make up the package `patchscope` (the repository root is the namespace).
PACKAGE_FOLDERS = ("common", "configs", "forensics", "generators", "attacks", "analysis", "cli")
NOT_COPIED = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "runs"}
PINNED = "device: cpu\nprecision: fp32\n"  # the same numbers on every CI machine (auto picks bf16 on some)


def _pip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Build outputs, caches and virtual environments (under any name: a folder with pyvenv.cfg)."""
    return {n for n in names if n in NOT_COPIED or n.endswith(".egg-info")
            or (Path(folder, n) / "pyvenv.cfg").is_file()}


def package_files(root: Path | None = None) -> set[str]:
    """Every file of the package folders, as the wheel names it: patchscope/forensics/models.py, ..."""
    root = root or ROOT
    return {"patchscope/" + p.relative_to(root).as_posix()
            for folder in PACKAGE_FOLDERS for p in (root / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}


def package_names(files: set[str]) -> set[str]:
    """The packages those files make: every folder holding a file (demo_assets holds only data)."""
    return {"patchscope"} | {str(Path(f).parent).replace("/", ".") for f in files}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = "0 (none)"
    if int(version.split(".")[0]) < 77:
        pytest.fail(f"setuptools {version} cannot build patchscope offline (pyproject's build-system asks for "
                    f">=77); `pip install -e '.[test]'` installs it")
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_ignore)
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(base / "dist"),
                 str(source), cwd=source)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = (base / "dist").glob("patchscope-*.whl")
    return found


@pytest.fixture(scope="session")
def wheel_names(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.fixture(scope="session")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new virtual environment outside the repository with the wheel installed in it. The test
    environment's site-packages is added as a plain path line of a .pth file, for torch and the other
    dependencies: a path line does not run the .pth files in that folder, so the editable install's
    finder (`__editable__*.pth`, which maps patchscope to the checkout) stays inactive."""
    env = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_environment_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env


def _run_in(env: Path, args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run a program of the fresh environment from a folder outside the repository, with no PYTHON*
    variables of the test session (PYTHONPATH could point into the checkout)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(args, cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout)


def test_the_package_list_in_pyproject_is_every_package_folder():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(set(listed)), "a package is listed twice"
    assert set(listed) == package_names(package_files())


def test_the_wheel_has_one_top_level_name(wheel_names):
    # Not forensics/, cli/, ... at the top of site-packages, where they would shadow other projects.
    tops = {name.split("/")[0] for name in wheel_names}
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert tops - dist_info == {"patchscope"} and len(dist_info) == 1


def test_the_wheel_holds_every_file_of_the_package_folders_and_nothing_else(wheel_names):
    # Every module, configs/*.yaml and analysis/demo_assets/*; no tests, benchmarks, docs or caches.
    expected = package_files()
    assert len([f for f in expected if f.endswith(".py")]) > 80  # the walk found the source
    for data in ("patchscope/configs/demo.yaml", "patchscope/analysis/demo_assets/pgan32_builtin.pt",
                 "patchscope/analysis/demo_assets/pgan32_builtin.json"):
        assert data in expected
    shipped = {name for name in wheel_names if name.startswith("patchscope/")}
    assert sorted(expected - shipped) == [], "missing from the wheel (a package or package-data entry in pyproject)"
    assert sorted(shipped - expected) == [], "in the wheel but not in the package folders"


def test_the_wheel_installs_the_patchscope_console_script(wheel, wheel_names):
    (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    assert {s: dict(parser[s]) for s in parser.sections()} == {"console_scripts": {"patchscope": "patchscope.cli:main"}}


def _module_names(files: set[str]) -> list[str]:
    return sorted(f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in files if f.endswith(".py"))


def test_the_installed_wheel_imports_every_module_from_its_own_files(fresh_env, tmp_path):
    # Every module of the repository, imported in the fresh environment: each must come from the install
    # (not from this checkout, through sys.path or an editable finder), and the data files be there too.
    probe = """
import importlib, json, sys
from importlib.resources import files as resources
names = json.loads(sys.argv[1])
files = {name: importlib.import_module(name).__file__ for name in names}
import patchscope
data = [str(resources("patchscope.configs") / "demo.yaml"),
        str(resources("patchscope.analysis.demo_assets") / "pgan32_builtin.pt")]
print(json.dumps({"path": list(patchscope.__path__), "files": files, "sys_path": sys.path, "data": data,
                  "finders": [repr(f) for f in sys.meta_path]}))
"""
    names = _module_names(package_files())
    result = _run_in(fresh_env, [str(fresh_env / "bin" / "python"), "-c", probe, json.dumps(names)], tmp_path,
                     timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)

    def outside(path: str) -> bool:
        return not Path(path).resolve().is_relative_to(fresh_env.resolve())

    assert seen["path"] and [p for p in seen["path"] if outside(p)] == []
    assert len(seen["files"]) == len(names) > 80
    assert [n for n, f in seen["files"].items() if outside(f)] == []
    assert [p for p in seen["sys_path"] if p and Path(p).resolve() == ROOT] == []
    assert not any("editable" in f.lower() for f in seen["finders"])
    assert all(Path(p).is_file() and not outside(p) for p in seen["data"])
    shown = _run_in(fresh_env, [str(fresh_env / "bin" / "patchscope"), "--help"], tmp_path, timeout=300)
    assert shown.returncode == 0 and "patchscope demo --out" in shown.stdout, shown.stderr


@pytest.mark.slow
def test_the_installed_console_script_runs_the_demo_outside_the_repository(fresh_env, tmp_path):
    # The quick demo, smaller still: it reads configs/demo.yaml and the bundled PGAN from the install.
    config = tmp_path / "tiny.yaml"
    config.write_text(PINNED + "quick:\n  counts: {train: 64, val: 32, test: 32}\n  train: {max_epochs: 1}\n"
                      "  heatmaps: 1\n  patches: 4\n  exaggerate: {steps: 2, eval_n: 8, batch_size: 8}\n"
                      "  finetune: {steps: 2, batch_size: 8, checkpoint_every: 1, log_every: 1, eval_n: 8,"
                      " compare_n: 16}\n")
    out = tmp_path / "out"
    result = _run_in(fresh_env, [str(fresh_env / "bin" / "patchscope"), "demo", "--quick", "--out", str(out),
                                 "--config", str(config)], tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in result.stdout
    bundled = Path(json.loads((out / "stages.json").read_text())["generator"]["summary"]["generator"])
    assert bundled.name == "pgan32_builtin.pt" and bundled.resolve().is_relative_to(fresh_env.resolve())


def test_packages_with_the_folder_names_do_not_shadow_patchscope(fresh_env, tmp_path):
    # PyPI packages claim the generic names (pyCLI installs cli/, `generators` installs generators/):
    # with such packages first on sys.path, the installed patchscope still finds its own modules.
    shadows = tmp_path / "shadows"
    for name in ("cli", "generators", "forensics", "analysis", "attacks", "common", "configs"):
        (shadows / name).mkdir(parents=True)
        (shadows / name / "__init__.py").write_text("main = load_generator = None  # someone else's package\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(shadows)
    probe = ("import cli, generators; assert cli.main is None\n"
             "from patchscope.generators import load_generator; from patchscope.cli import main\n"
             "assert callable(load_generator) and main.commands, 'patchscope shadowed'\n"
             "print(sorted(main.commands))")
    result = subprocess.run([str(fresh_env / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'train'" in result.stdout and "'demo'" in result.stdout
    shown = subprocess.run([str(fresh_env / "bin" / "patchscope"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "patchscope demo --out" in shown.stdout, shown.stderr
