"""The package's shape: one import name, imports that run one way, and no circles.

Tests run from the repository root, where ``import db`` would still resolve through the current
folder, so a missed ``facefind.`` prefix passes every other test locally and breaks only in an
installed wheel. These tests read the sources instead of importing them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("db", "trainer", "indexer", "retrieval")  # installed as facefind.<folder>
LAYER = {name: rank for rank, name in enumerate(FOLDERS)}  # an import may only point to a lower rank


def python_files() -> list[Path]:
    places = [ROOT / name for name in (*FOLDERS, "tests", "scripts")]
    return sorted(p for place in places if place.exists() for p in place.rglob("*.py"))


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in a module, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def bare_imports(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line: name`` of every import of a folder by its bare name, at any depth."""
    bare = []
    for path in paths:
        for line, name in imported_names(ast.parse(path.read_text(), str(path))):
            if name.split(".")[0] in FOLDERS:
                bare.append(f"{path.relative_to(root)}:{line}: {name}")
    return bare


def test_no_bare_imports_of_our_folders() -> None:
    bare = bare_imports(python_files())
    assert not bare, "import these as facefind.<folder>...:\n" + "\n".join(bare)


def module_graph() -> dict[str, set[str]]:
    """facefind module -> the facefind modules it imports (module or function level)."""
    modules = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules["facefind." + ".".join(parts)] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for _, target in imported_names(ast.parse(path.read_text(), str(path))):
            while target and target not in modules:  # `from facefind.db.errors import X` -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def test_imports_run_one_way() -> None:
    """retrieval -> indexer -> trainer -> db: nothing points up."""
    upward = [f"{a} -> {b}" for a, targets in module_graph().items() for b in targets
              if LAYER[b.split(".")[1]] > LAYER[a.split(".")[1]]]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles() -> None:
    graph = module_graph()
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_guard_sees_a_bare_import(tmp_path: Path) -> None:
    """The guard above finds bare imports inside functions and in ``import x.y`` form, and lets the
    ``facefind.`` ones and other packages' look-alikes (``dbm``) pass."""
    module = tmp_path / "mod.py"
    module.write_text("import dbm\nimport facefind.db.errors\nimport trainer.fit\n\n"
                      "def f():\n    from db.errors import X\n    from facefind.db import files\n")
    assert bare_imports([module], tmp_path) == ["mod.py:3: trainer.fit", "mod.py:6: db.errors.X"]


@pytest.mark.slow
def test_wheel_holds_only_facefind(tmp_path: Path) -> None:
    """The built wheel's one top-level name is ``facefind``, with the page's static files inside."""
    src = tmp_path / "src"
    for name in (*FOLDERS, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=240)
    [wheel] = out.glob("facefind-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"facefind"}
    assert "facefind/retrieval/web/static/index.html" in names
    # every module of the source tree is in the wheel (a package missing from pyproject's list is not)
    sources = {"facefind/" + p.relative_to(ROOT).as_posix() for folder in FOLDERS
               for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert sources - set(names) == set()
