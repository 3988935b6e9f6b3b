# SPDX-License-Identifier: Apache-2.0
"""The package's layers run one way: no import cycle (function-local imports included), and the
optimizers, the kernels and the sweep know only what docs/ARCHITECTURE.md says they know."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gimli_bptt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
                candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                              for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:
                    c = c.rpartition(".")[0]
                if c and c != name and c.startswith("gimli_bptt"):
                    deps.add(c)
        graph[name] = deps
    return graph


GRAPH = _imports()


def _reaches(start: str, goal: str) -> list[str] | None:
    """A path of imports from ``start`` to ``goal``, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycle() -> None:
    for module in GRAPH:
        cycle = _reaches(module, module)
        # a package's __init__ re-exporting its submodules is the one allowed loop shape
        if cycle is not None and not all(m == module or m.startswith(module + ".") for m in cycle):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.parametrize("low, high", [
    ("gimli_bptt.kernels", "gimli_bptt.optim"),   # kernels never call an optimizer
    ("gimli_bptt.optim", "gimli_bptt.kernels"),   # optimizers declare their flat layout, never dispatch
    ("gimli_bptt.optim", "gimli_bptt.stepping"),
    ("gimli_bptt.options", "gimli_bptt.hvp"),     # the options' allowed values stand below the engine
    ("gimli_bptt.metaparams.declaration", "gimli_bptt.optim"),  # φ's declaration knows no optimizer
    ("gimli_bptt.second_order.registry", "gimli_bptt.second_order.safe_mode"),  # the mode reads the registry
    ("gimli_bptt.reverse", "gimli_bptt.kernels"),  # the tape and the sweep do not know the kernels' buffers
    ("gimli_bptt.reverse.schedules", "gimli_bptt.reverse.tape"),  # the plan, the schedules and the meter plan
    ("gimli_bptt.reverse.schedule_costs", "gimli_bptt.reverse.tape"),  # and measure, the tape executes
    ("gimli_bptt.reverse.plan", "gimli_bptt.reverse.tape"),
    ("gimli_bptt.reverse.meter", "gimli_bptt.reverse.tape"),
    ("gimli_bptt.reverse", "gimli_bptt.tasks"),  # the task dimension is the inner problem's (problem.py)
    ("gimli_bptt.stepping", "gimli_bptt.tasks"),
    ("gimli_bptt.memory", "gimli_bptt.reverse"),  # the memory option knows no plan
    ("gimli_bptt.memory_probe", "gimli_bptt.reverse"),
])
def test_layers_run_one_way(low: str, high: str) -> None:
    for module in GRAPH:
        if module == low or module.startswith(low + "."):
            for dep in GRAPH[module]:
                assert not (dep == high or dep.startswith(high + ".")), f"{module} imports {dep}"


def test_the_graph_is_read() -> None:
    """The checks above see real imports (so that they can fail)."""
    assert "gimli_bptt.optim.base" in GRAPH["gimli_bptt.optim.sgd"]
    assert "gimli_bptt.kernels.flat" in GRAPH["gimli_bptt.stepping"]
    assert "gimli_bptt.optim.base" in GRAPH["gimli_bptt.stepping"]
    assert "gimli_bptt.options" in GRAPH["gimli_bptt.hvp"]
    assert "gimli_bptt.metaparams.declaration" in GRAPH["gimli_bptt.optim.declarations"]
    assert "gimli_bptt.reverse.schedules" in GRAPH["gimli_bptt.reverse.plan"]
    assert "gimli_bptt.reverse.tape" in GRAPH["gimli_bptt.reverse.sweep"]
