"""The package's shape: layers import downwards only, no import cycles, no oversized files.

Read from the source with ``ast`` (imports inside functions and ``importlib.import_module("...")``
calls count too), so the test sees what a reader sees, whatever happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"

# Lower layers never import higher ones. Within a layer, imports are allowed but must not form a cycle.
LAYERS = {
    "quantkit._version": 0,
    "quantkit.errors": 0,
    "quantkit.config": 0,
    "quantkit.qmath": 0,
    "quantkit.devices": 0,
    "quantkit.kernels": 1,
    "quantkit.core": 2,
    "quantkit.formats": 3,
    "quantkit.evaluation": 4,
    "quantkit.cli": 5,
}
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The quantkit modules that ``name`` imports (a package import counts as its ``__init__``)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # "quantkit.core.modules.W8A8Linear" -> the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "quantkit":
                continue
            for alias in node.names:  # "from . import arch" imports the submodule
                sub = f"{mod}.{alias.name}"
                add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "quantkit":
                    add(alias.name)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("quantkit"):
                add(node.args[0].value)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    for prefix, rank in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def test_every_module_belongs_to_a_layer():
    assert [m for m in _modules() if m != "quantkit" and _layer(m) is None] == []


def test_layers_import_downwards_and_nothing_imports_the_package_root():
    bad = []
    for module, targets in _graph().items():
        if module == "quantkit":  # the root re-exports the public API
            continue
        for t in targets:
            if t == "quantkit" or _layer(t) > _layer(module):
                bad.append(f"{module} -> {t}")
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above can fail: a made-up package with both faults is caught."""
    pkg = tmp_path / "quantkit"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from .core import a\n")  # a leaf importing upwards
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "core" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"quantkit.config -> quantkit.core.a"):
        test_layers_import_downwards_and_nothing_imports_the_package_root()
    with pytest.raises(AssertionError, match=r"quantkit.core.a -> quantkit.core.b -> quantkit.core.a"):
        test_no_import_cycles()
