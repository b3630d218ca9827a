"""The architecture, read from the source with `ast`: every import is `patchscope.*`, imports go down
the floors, no module imports itself in a circle, and no source file grows past 400 lines.

Floors, top to bottom: cli -> analysis -> attacks -> {forensics, generators} -> {common, configs}.
Each checker takes a repository root, so the tests below run it on a small synthetic tree with one
planted defect (to show it can fail) and then on this repository.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "patchscope"
# Floor of each package folder; a module may import its own package or any lower floor. common and
# configs are the bottom: they import nothing of patchscope but themselves.
FLOORS = {"common": 0, "configs": 0, "forensics": 1, "generators": 1, "attacks": 2, "analysis": 3, "cli": 4}
# Folders of scripts and tests: held to the `patchscope.*` rule, free to import any floor, and never
# imported by the package (they are not in the wheel).
OUTSIDE = ("tests", "benchmarks")
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    """One import statement's target, as an absolute dotted name."""
    module: str          # the importing module, e.g. patchscope.attacks.shift
    target: str          # the module it names, e.g. patchscope.forensics.models
    line: int
    top_level: bool      # runs when the module is imported (not inside a function, not TYPE_CHECKING)
    path: Path

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    """patchscope.forensics.data for forensics/data.py; tests.x and benchmarks.x stay outside."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] in OUTSIDE else [NAMESPACE, *parts])


def source_files(root: Path, folders=tuple(FLOORS) + OUTSIDE) -> list[Path]:
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=None)
def known_modules(root: Path) -> frozenset[str]:
    return frozenset(module_name(p, root) for p in source_files(root))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path, modules: frozenset[str]) -> list[Import]:
    """Every import statement in the file, module level and inside functions, relative ones resolved.

    `from pkg import name` targets pkg.name when that is a module (a submodule import), else pkg."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top_level = False
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, node.lineno, top_level, path) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(module, sub if sub in modules else base, node.lineno, top_level, path))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, top_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top_level)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


@functools.lru_cache(maxsize=None)  # parsed once per tree: the checks below all read it
def all_imports(root: Path) -> tuple[Import, ...]:
    modules = known_modules(root)
    return tuple(imp for path in source_files(root) for imp in imports_of(path, root, modules))


# --- the checks: each returns a list of human-readable violations ------------------------------------

def legacy_imports(root: Path) -> list[str]:
    """Imports of a folder by its bare name (`import forensics`, `from cli.common import ...`): they
    work only from a checkout's root, never from the wheel. Tests may import `tests.*`; nothing may
    import `patchscope.tests` or `patchscope.benchmarks` (a second name for the same files)."""
    bad = []
    for imp in all_imports(root):
        top = imp.target.split(".")[0]
        in_tests = imp.module.split(".")[0] == "tests"
        if top in FLOORS or top == "benchmarks" or (top == "tests" and not in_tests):
            bad.append(f"{imp.where(root)} imports {imp.target!r}")
        elif imp.target.split(".")[:2] in ([NAMESPACE, "tests"], [NAMESPACE, "benchmarks"]):
            bad.append(f"{imp.where(root)} imports {imp.target!r}")
    return bad


def missing_targets(root: Path) -> list[str]:
    """`patchscope.*` imports of modules that no file provides: stale names a lazy import would only
    reveal when its function runs."""
    modules = known_modules(root)
    return [f"{imp.where(root)} imports {imp.target!r}, which no file provides" for imp in all_imports(root)
            if imp.target.startswith(NAMESPACE + ".") and imp.target not in modules]


def floor_violations(root: Path) -> list[str]:
    """Imports that go up a floor or sideways into another package of the same floor
    (forensics <-> generators, common <-> configs). tests/ and benchmarks/ may import anything."""
    bad = []
    for imp in all_imports(root):
        src, dst = imp.module.split("."), imp.target.split(".")
        if src[0] != NAMESPACE or dst[0] != NAMESPACE or len(src) < 2 or len(dst) < 2:
            continue
        if dst[1] not in FLOORS:
            continue  # patchscope.tests / benchmarks: legacy_imports reports those
        if dst[1] != src[1] and FLOORS[dst[1]] >= FLOORS[src[1]]:
            bad.append(f"{imp.where(root)}: {src[1]} (floor {FLOORS[src[1]]}) imports {imp.target} "
                       f"(floor {FLOORS[dst[1]]})")
    return bad


def import_graph(root: Path, top_level_only: bool = True) -> dict[str, dict[str, Import]]:
    """module -> {imported patchscope module: the first statement importing it}."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in known_modules(root) if m.startswith(NAMESPACE)}
    for imp in all_imports(root):
        if imp.module in graph and imp.target in graph and (imp.top_level or not top_level_only):
            first = graph[imp.module].get(imp.target)
            if first is None or (imp.top_level and not first.top_level):  # a module-level edge wins
                graph[imp.module][imp.target] = imp
    return graph


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, Import]], root: Path) -> str:
    steps = ", ".join(graph[a][b].where(root) for a, b in zip(cycle, cycle[1:]))
    return "  " + " -> ".join(cycle) + f"  ({steps})"


def describe_cycles(graph: dict[str, dict[str, Import]], root: Path, limit: int = 10) -> str:
    """Up to `limit` cycles, each with the statement of every step; empty when there is none. After
    each one found, its closing edge is dropped so that the next search finds another."""
    graph = {node: dict(edges) for node, edges in graph.items()}
    lines = []
    while len(lines) < limit and (cycle := find_cycle(graph)):
        lines.append(_describe(cycle, graph, root))
        del graph[cycle[-2]][cycle[-1]]
    return "\n".join(lines)


def _path(graph: dict[str, dict[str, Import]], start: str, goal: str) -> list[str] | None:
    """A shortest import path start -> ... -> goal (breadth first), or None."""
    previous = {start: start}
    queue = [start]
    for node in queue:
        if node == goal:
            path = [goal]
            while path[-1] != start:
                path.append(previous[path[-1]])
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def lazy_cycles(root: Path) -> str:
    """Cycles that a function-level import closes: for each import a -> b made only inside a function,
    a path back from b to a. Such an import defers the cycle to run time instead of removing it."""
    graph = import_graph(root, top_level_only=False)
    lines = []
    for a in sorted(graph):
        for b, imp in sorted(graph[a].items()):
            if not imp.top_level and (back := _path(graph, b, a)):
                lines.append(_describe([a, *back], graph, root))
    return "\n".join(lines)


def long_files(root: Path, limit: int = MAX_LINES) -> list[str]:
    """Source files of the package folders over `limit` lines: split by idea before that."""
    counts = {p: len(p.read_text().splitlines()) for p in source_files(root, tuple(FLOORS))}
    return [f"{p.relative_to(root)}: {n} lines" for p, n in counts.items() if n > limit]


# --- each check catches a planted defect in a synthetic tree -----------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    base = {"common/__init__.py": "", "common/errors.py": "", "configs/__init__.py": "",
            "forensics/__init__.py": "", "forensics/models.py": "from patchscope.common.errors import x\n",
            "generators/__init__.py": "", "generators/pgan/__init__.py": "",
            "generators/pgan/zoo.py": "from patchscope.generators import base\n", "generators/base.py": "",
            "attacks/__init__.py": "", "attacks/shift.py": "from patchscope.forensics.models import m\n",
            "analysis/__init__.py": "", "cli/__init__.py": "from patchscope.analysis import a\n",
            "tests/__init__.py": "", "tests/helpers.py": "",
            "tests/test_x.py": "from tests.helpers import h\nfrom patchscope.cli import main\n"}
    for name, text in {**base, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_synthetic_clean_tree_passes_every_check(tmp_path):
    root = _tree(tmp_path, {})
    assert legacy_imports(root) == missing_targets(root) == floor_violations(root) == long_files(root) == []
    assert find_cycle(import_graph(root, top_level_only=False)) is None and lazy_cycles(root) == ""


@pytest.mark.parametrize("where, text", [
    ("attacks/shift.py", "import forensics\n"),
    ("attacks/shift.py", "from generators.pgan import zoo\n"),
    ("benchmarks/bench.py", "def f():\n    from cli.common import user_errors\n"),
    ("tests/test_y.py", "from common import errors\n"),
    ("forensics/models.py", "from tests.helpers import h\n"),
    ("tests/test_y.py", "import patchscope.tests.helpers\n"),
])
def test_a_bare_folder_name_import_is_caught(tmp_path, where, text):
    assert len(legacy_imports(_tree(tmp_path, {where: text}))) == 1


def test_a_relative_import_resolves_inside_patchscope(tmp_path):
    root = _tree(tmp_path, {"generators/pgan/zoo.py": "from ..base import b\nfrom . import zoo\n",
                            "forensics/models.py": "from ..generators import base\n"})
    assert legacy_imports(root) == missing_targets(root) == []
    assert [v.split(":")[0] for v in floor_violations(root)] == ["forensics/models.py"]


def test_an_import_of_a_module_that_no_file_provides_is_caught(tmp_path):
    root = _tree(tmp_path, {"attacks/shift.py": "def f():\n    from patchscope.forensics.gone import x\n"})
    assert missing_targets(root) == ["attacks/shift.py:2 imports 'patchscope.forensics.gone', which no file provides"]


@pytest.mark.parametrize("where, text", [
    ("attacks/shift.py", "from patchscope.analysis import a\n"),                 # up a floor
    ("forensics/models.py", "def f():\n    import patchscope.generators.base\n"),  # sideways, in a function
    ("generators/base.py", "from patchscope.forensics import models\n"),         # sideways
    ("common/errors.py", "from patchscope.configs import c\n"),                  # the bottom imports nothing
    ("configs/__init__.py", "import patchscope.forensics\n"),
    ("analysis/__init__.py", "if TYPE_CHECKING:\n    from patchscope.cli import main\n"),
])
def test_an_import_against_the_floors_is_caught(tmp_path, where, text):
    assert len(floor_violations(_tree(tmp_path, {where: text}))) == 1


def test_a_cycle_is_found_and_named_with_its_lines(tmp_path):
    root = _tree(tmp_path, {"forensics/__init__.py": "from patchscope.forensics.models import m\n",
                            "forensics/models.py": "import patchscope.forensics.data\n",
                            "forensics/data.py": "from patchscope.forensics import x\n"})
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 4
    described = describe_cycles(import_graph(root), root)
    assert len(described.splitlines()) == 1 and "forensics/data.py:1" in described


def test_a_cycle_closed_only_by_a_function_level_import_is_caught_separately(tmp_path):
    root = _tree(tmp_path, {"forensics/models.py": "import patchscope.forensics.data\n",
                            "forensics/data.py": "def load():\n    from patchscope.forensics import models\n"})
    assert describe_cycles(import_graph(root), root) == ""
    assert lazy_cycles(root).split() == ["patchscope.forensics.data", "->", "patchscope.forensics.models", "->",
                                         "patchscope.forensics.data", "(forensics/data.py:2,", "forensics/models.py:1)"]


def test_a_lazy_import_without_a_way_back_is_no_cycle(tmp_path):
    root = _tree(tmp_path, {"forensics/data.py": "def load():\n    from patchscope.forensics import models\n"})
    assert lazy_cycles(root) == ""


def test_a_type_checking_import_is_not_a_runtime_edge(tmp_path):
    root = _tree(tmp_path, {"forensics/models.py": "import patchscope.forensics.data\n",
                            "forensics/data.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from patchscope.forensics import models\n"})
    assert find_cycle(import_graph(root)) is None


def test_a_long_file_is_caught(tmp_path):
    root = _tree(tmp_path, {"attacks/big.py": "x = 1\n" * (MAX_LINES + 1), "tests/test_big.py": "x = 1\n" * 999})
    assert long_files(root) == [f"attacks/big.py: {MAX_LINES + 1} lines"]


# --- the same checks on this repository ---------------------------------------------------------------

def test_the_real_tree_is_what_the_checks_read():
    # Guards the checks against passing on an empty walk (a moved folder, a changed ROOT).
    modules = known_modules(ROOT)
    for name in ("patchscope.common.atomic", "patchscope.configs", "patchscope.forensics.models",
                 "patchscope.generators.pgan.zoo", "patchscope.attacks.shift", "patchscope.analysis.demo",
                 "patchscope.cli", "tests.conftest"):
        assert name in modules
    assert sum(imp.target.startswith(NAMESPACE + ".") for imp in all_imports(ROOT)) > 300


def test_every_import_names_patchscope_not_a_bare_folder():
    assert legacy_imports(ROOT) == []


def test_every_patchscope_import_names_an_existing_module():
    assert missing_targets(ROOT) == []


def test_imports_only_go_down_the_floors():
    assert floor_violations(ROOT) == []


def test_no_import_cycle_among_module_level_imports():
    assert describe_cycles(import_graph(ROOT), ROOT) == ""


def test_no_function_level_import_closes_a_cycle():
    # A lazy import that closes a cycle hides it from the check above; the modules should be split instead.
    assert lazy_cycles(ROOT) == ""


def test_no_source_file_is_over_400_lines():
    assert long_files(ROOT) == []
