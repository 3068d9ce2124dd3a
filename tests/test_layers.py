"""The structure stays: imports only go down the layers, and no module imports itself through others.

Layers, bottom to top (``docs``: README "Code layout"):

0. ``streams``      contracts, settings, topics, the Faust app, the model registry, drift signals
1. ``vectorstore``, ``models``   (vectorstore may use models' encoder; models never the vector store)
2. ``agents`` (the worker), ``evaluation`` (the offline harness), ``retrain`` (the retrain job): never each other
3. ``cli``          the command line, on top of everything

Every import counts, at module level or inside a function; only those under ``if TYPE_CHECKING:`` are
ignored (they never run). :data:`KNOWN_UPWARD` would list tolerated exceptions (there are none); a new upward
import fails this test, and so does a listed one that is gone (take it off the list).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"streams": 0, "vectorstore": 1, "models": 1, "agents": 2, "evaluation": 2, "retrain": 2, "cli": 3}
SAME_LAYER_ALLOWED = {("vectorstore", "models")}
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        for name in _imports(path):
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]  # an attribute of a module, not a module
            if name in modules and name != mod:
                graph[mod].add(name)
    return graph


def _upward(source: str, target: str) -> bool:
    a, b = source.split(".")[0], target.split(".")[0]
    if a == b:
        return False
    if PACKAGES[b] < PACKAGES[a]:
        return False
    return not (PACKAGES[b] == PACKAGES[a] and (a, b) in SAME_LAYER_ALLOWED)


def test_imports_only_go_down_the_layers() -> None:
    upward = {(m, t) for m, targets in _graph().items() for t in targets if _upward(m, t)}
    new = upward - KNOWN_UPWARD
    assert not new, f"imports going up or sideways between layers: {sorted(new)}"
    gone = KNOWN_UPWARD - upward
    assert not gone, f"no longer imported, take them off KNOWN_UPWARD: {sorted(gone)}"


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_imports_inside_functions_but_not_type_checking_ones(tmp_path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cli.base import cli\n"
                   "def f():\n    from retrain import cycle\n    import agents.web\n")
    assert _imports(src) == {"retrain", "retrain.cycle", "agents.web"}


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120


def _project_files() -> list[Path]:
    """Every Python file of the project: the packages, the tests, the benchmarks and the scripts."""
    skip = {".venv", ".venv-vllm", ".git", "build", "dist"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def test_modules_and_functions_stay_short() -> None:
    long_modules, long_functions = [], []
    for path in _project_files():
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append((name, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}:{node.name}", length))
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines (split them by stage): {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines (stages as functions): {long_functions}"
