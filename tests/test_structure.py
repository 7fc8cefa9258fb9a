"""The shape of the package (design.md): no import circles, a torch-free config, short functions, no
private names across modules, and the public surface with its stated signatures.

Read from the source with `ast` (no model, no network); only the public-surface test imports the modules.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "duetlm"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
TREES: dict[str, ast.Module] = {
    m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in MODULES.items()
}


@dataclass(frozen=True)
class Import:
    """One name a duetlm module imports from another: `target` is the module it comes from, `name` the
    imported name (None for `import a.b`), `line` where."""

    source: str
    target: str
    name: str | None
    line: int


def _package_of(module: str) -> str:
    """The package a relative import in `module` is relative to."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[Import]:
    """Every import of a duetlm module in `module`, at any level (functions, `if TYPE_CHECKING:`, ...).

    `from duetlm.pkg import x` where `x` is a submodule counts as an import of `duetlm.pkg.x`.
    """
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append(Import(module, alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append(Import(module, sub, None, node.lineno))
                else:
                    found.append(Import(module, target, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported duetlm module: first line that imports it} (self-imports left out)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for m in MODULES:
        for imp in imports_of(m):
            if imp.target != m and imp.target in MODULES:
                graph[m].setdefault(imp.target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    """The shortest import path start -> ... -> start inside one component (BFS)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle of its component")


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


# --------------------------------------------------------------------------------------------------
# The checker itself, on a hand-made graph (so a passing repository test means something)


def test_cycle_finder_by_hand():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"f": 5}, "f": {"e": 6}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e", "f"]]
    assert shortest_cycle(graph, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert describe_cycle(graph, ["e", "f", "e"]) == "e (line 5) -> f (line 6) -> e"
    assert strongly_connected({"a": {"b": 1}, "b": {}}) == []


def test_import_resolution_covers_relative_and_submodule_imports():
    # Every way of naming a module resolves to that module: engines/hf.py imports engines.base,
    # the pipeline imports `from duetlm import protocol` (a submodule, not a name of duetlm/__init__).
    graph = import_graph()
    assert "duetlm.engines.base" in graph["duetlm.engines.hf"]
    assert "duetlm.protocol" in graph["duetlm.pipeline"]
    assert _resolve("duetlm.engines.hf", ast.parse("from . import base").body[0]) == "duetlm.engines"
    assert _resolve("duetlm.engines", ast.parse("from .hf import x").body[0]) == "duetlm.engines.hf"
    assert _resolve("duetlm.serve.app", ast.parse("from ..protocol import y").body[0]) == "duetlm.protocol"
    # imports inside functions count: pipeline.build_hf_engine imports HFEngine in its body
    assert "duetlm.engines.hf" in graph["duetlm.pipeline"]


# --------------------------------------------------------------------------------------------------
# The repository


def test_no_import_circles():
    graph = import_graph()
    circles = [describe_cycle(graph, shortest_cycle(graph, c[0], set(c))) for c in strongly_connected(graph)]
    assert not circles, "import circles between duetlm modules:\n  " + "\n  ".join(circles)


def test_config_imports_without_torch():
    code = "import sys, duetlm.config; assert 'torch' not in sys.modules, 'duetlm.config imported torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def long_functions() -> list[str]:
    found = []
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{MODULES[m].relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_over_80_lines():
    offenders = long_functions()
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(offenders)


def test_no_private_names_imported_across_modules():
    private = [
        f"{MODULES[imp.source].relative_to(SRC)}:{imp.line} imports {imp.name} from {imp.target}"
        for m in MODULES
        for imp in imports_of(m)
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != m
    ]
    assert not private, "private names imported from other duetlm modules:\n  " + "\n  ".join(private)


# --------------------------------------------------------------------------------------------------
# Public surface (design.md): the stated parameters, in order, with the stated defaults; any further
# parameter must have a default, so every call written against the surface still works.

REQUIRED = inspect.Parameter.empty


def check_signature(func, stated: list[tuple[str, object]]) -> None:
    params = list(inspect.signature(func).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    got = [(p.name, p.default) for p in params[: len(stated)]]
    assert got == stated, f"{func.__qualname__}{inspect.signature(func)}: want {stated}"
    extra = [p.name for p in params[len(stated) :] if p.default is REQUIRED]
    assert not extra, f"{func.__qualname__}: parameters beyond the public surface need defaults: {extra}"


def test_public_surface_grading_and_problems():
    from duetlm.grading import grade
    from duetlm.problems import Problem, load_problems

    check_signature(grade, [("response", REQUIRED), ("problem", REQUIRED)])
    check_signature(load_problems, [("source", REQUIRED), ("split", None), ("limit", None)])
    names = [f.name for f in fields(Problem)]
    assert names[:6] == ["id", "question", "answer", "kind", "choices", "source"], names
    p = Problem(id="x", question="What is 2 + 3?", answer="5")
    assert (p.kind, p.choices, p.source) == ("math", (), "")
    assert grade("so \\boxed{5}", p) == 1.0 and grade("so \\boxed{6}", p) == 0.0


def test_public_surface_protocol():
    from duetlm.protocol import extract_signal

    check_signature(extract_signal, [("text", REQUIRED)])
    s = extract_signal("<think> z </think> y")
    assert (s.text, s.complete) == ("z", True)
    s = extract_signal("cut off")
    assert (s.text, s.complete) == ("cut off", False)


def test_public_surface_lambda_controller():
    from duetlm.objective import LambdaController

    check_signature(
        LambdaController.__init__,
        [("init", 0.0), ("step_size", 0.01), ("bound", 1000), ("max_value", 1.0), ("schedule", "adaptive")],
    )
    check_signature(LambdaController.update, [("mean_length", REQUIRED)])
    lam = LambdaController(step_size=0.5, bound=10)
    assert lam.value == 0.0
    assert lam.update(20) == pytest.approx(0.5) == lam.value  # 0 + 0.5 * (20 / 10 - 1)
    fresh = LambdaController(step_size=0.5, bound=10)
    fresh.load_state_dict(lam.state_dict())
    assert fresh.value == pytest.approx(0.5)


def test_public_surface_group_advantages():
    import torch

    from duetlm.grpo import group_advantages

    check_signature(
        group_advantages, [("rewards", REQUIRED), ("group_ids", REQUIRED), ("norm_std", True), ("eps", 1e-6)]
    )
    adv = group_advantages(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0, 0, 1]), norm_std=False)
    assert adv.tolist() == [0.5, -0.5, 0.0]
