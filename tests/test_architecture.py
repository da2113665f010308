"""The house rules of ARCHITECTURE.md, checked on the source: no import cycles, imports only
downwards through the layers, no method module borrowing from another, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "metrics", "attacks")
MAX_LINES = 400

# The layers of ARCHITECTURE.md, lowest first: a module may import its own layer and the ones
# below it. The contracts are the plug-in modules at the top of harness/.
CONTRACTS = ("harness", "harness.cache", "harness.errors", "harness.files", "harness.registry",
             "harness.params", "harness.steps", "harness.seeds", "harness.method", "harness.metric",
             "harness.stack", "harness.prepare", "harness.prompts", "harness.attack")
LAYERS = {
    "contracts": 0,
    "harness.models": 1,
    "harness.mini": 2,
    "methods": 3,
    "metrics": 3,
    "attacks": 3,
    "harness.run": 4,
    "harness.reporting": 5,
    "harness.cli": 6,
    "harness.__main__": 6,
}
# Rooms of one layer that must not import each other (plug-ins know only the contracts).
SEPARATE = {(a, b) for a in ("methods", "metrics", "attacks")
            for b in ("methods", "metrics", "attacks") if a != b}
# What a plug-in may import beyond the contracts and its own package.
ALLOWED_BELOW = {"methods": set(), "metrics": {"harness.mini"}, "attacks": set()}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports (anywhere in the file, lazily or not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def room(module: str) -> str:
    """The layer key of a module: a contract, or the longest room prefix."""
    if module in CONTRACTS:
        return "contracts"
    for key in sorted(LAYERS, key=len, reverse=True):
        if key != "contracts" and (module == key or module.startswith(key + ".")):
            return key
    raise AssertionError(f"{module} belongs to no layer of ARCHITECTURE.md: add it there")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (iterative depth-first search)."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        here = room(src)
        for dst in sorted(targets):
            there = room(dst)
            if LAYERS[there] > LAYERS[here] or (here, there) in SEPARATE:
                bad.append(f"{src} imports {dst} ({here} may not import {there})")
            elif here in ALLOWED_BELOW and there not in {"contracts", here} | ALLOWED_BELOW[here]:
                bad.append(f"{src} imports {dst} (a plug-in may import the contracts, its own "
                           f"package and {sorted(ALLOWED_BELOW[here]) or 'nothing else'})")
            elif here == "methods" and _method_module(src) and _method_module(dst):
                bad.append(f"{src} imports {dst} (methods share helpers through "
                           "methods._common only)")
    return bad


def _method_module(name: str) -> bool:
    """A method's own module (methods.<name>), not the package or its shared helpers."""
    parts = name.split(".")
    return parts[0] == "methods" and len(parts) > 1 and parts[1] != "_common"


def test_the_layering_rule_catches_an_upward_import():
    assert violations({"methods.x": {"harness.run.cell"}})
    assert violations({"metrics.x": {"methods.y"}})
    assert violations({"methods.x": {"methods.y"}})
    assert violations({"harness.models.x": {"harness.mini.y"}})
    assert not violations({"methods.x": {"methods._common.unet", "harness.method"}})
    assert not violations({"harness.reporting.x": {"harness.run.store", "harness.models"}})


def test_imports_follow_the_layers_of_architecture_md():
    assert violations(graph()) == []


def test_modules_stay_small():
    sizes = {name: path.read_text().count("\n") for name, path in modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_every_room_is_in_architecture_md():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for key in LAYERS:
        path = key.replace(".", "/")
        assert key == "contracts" or f"`{path}/`" in text or f"`{path}.py`" in text, key
