"""The code's layout: no import cycles inside `search/`, Optuna internals in one module only."""

from __future__ import annotations

import ast
from pathlib import Path

from search import storage

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "search"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The search modules `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:  # `search.datasets.mnist.load` -> the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "search":
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_search_has_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in search/: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_PRIVATE_ATTRS = {entry.rpartition(".")[2] if kind == "instance" else entry
                  for kind, entry in storage.OPTUNA_INTERNALS}


def _optuna_internals_used(path: Path) -> list[str]:
    used = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
            names = [node.module] + [a.name for a in node.names]
            used += [f"from {node.module} import {a.name}" for a in node.names
                     if any(part.startswith("_") for n in names for part in n.split("."))]
        elif isinstance(node, ast.Import):
            used += [a.name for a in node.names
                     if a.name.startswith("optuna") and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr in _PRIVATE_ATTRS:
            used.append(f".{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("optuna.") and "._" in node.value:
            used.append(repr(node.value))
    return used


def test_only_storage_touches_optuna_internals():
    offenders = {name: used for name, path in _modules().items()
                 if name != "search.storage" and (used := _optuna_internals_used(path))}
    assert not offenders, f"Optuna internals outside search/storage.py: {offenders}"
    assert _optuna_internals_used(PACKAGE / "storage.py"), "the check must see storage.py's own uses"
