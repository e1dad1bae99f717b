"""Imports only go down: no import cycle among edgespec's modules, read from the source with `ast`
(nothing is imported). Every import counts, module-level or inside a function (a lazy import is still
a dependency). An edge goes to the module named (`from edgespec.x import y` names edgespec.x.y when that
is a module, else edgespec.x); a package's own __init__ is not implied by importing one of its modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "edgespec"

# The wings, lowest first, and which other wings each may import (edgespec/<wing>/__init__.py says why).
# "edgespec" itself (the package's face) may import the engine and the base.
WINGS = {
    "base": set(),
    "offload": {"base"},
    "core": {"base"},
    "scheduler": {"base", "core"},
    "loading": {"base", "offload", "core"},
    "distributed": {"base", "offload", "core", "scheduler", "loading"},
    "engine": {"base", "offload", "core", "scheduler", "loading", "distributed"},
    "front": {"base", "offload", "core", "scheduler", "loading", "distributed", "engine"},
}
FACE = {"engine", "base"}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The edgespec modules that module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_lazy_and_relative_imports():
    edges = graph()
    assert "edgespec.loading.loader" in edges["edgespec.engine.engine"]  # a function-level import in from_pretrained
    assert "edgespec.offload.api" in edges["edgespec.offload"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_in_edgespec():
    found = cycles(graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def wing(module: str) -> str | None:
    """The wing a module lives in ("edgespec.core.tree" → "core"); None for the package's face."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def wing_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that crosses into a wing its own wing may not import."""
    bad = []
    for mod, targets in sorted(edges.items()):
        mine = wing(mod)
        allowed = FACE if mine is None else WINGS[mine]
        for target in sorted(targets):
            theirs = wing(target)
            if theirs != mine and theirs not in allowed:
                bad.append(f"{mod} imports {target} ({mine or 'edgespec'} may import {sorted(allowed) or 'nothing'})")
    return bad


def test_every_module_lives_in_a_wing():
    loose = [m for m in graph() if m != "edgespec" and wing(m) not in WINGS]
    assert not loose, f"modules outside the wings {sorted(WINGS)}: {loose}"


def test_imports_follow_the_wing_rules():
    bad = wing_violations(graph())
    assert not bad, "\n".join(bad)


def test_the_wing_rules_catch_a_planted_import():
    """The checker fails on what the rules forbid: the core importing a front end or loading, offload
    importing the core, the base importing anything."""
    edges = graph()
    for planted in [("edgespec.core.tree", "edgespec.front.cli"), ("edgespec.core.search", "edgespec.loading.loader"),
                    ("edgespec.offload.streamer", "edgespec.core.kv"), ("edgespec.base.stats", "edgespec.core.tree"),
                    ("edgespec.scheduler.policy", "edgespec.engine.step")]:
        mod, target = planted
        bad = wing_violations({**edges, mod: edges[mod] | {target}})
        assert bad == [next(b for b in bad if b.startswith(f"{mod} imports {target} "))], bad


def test_offload_does_not_import_the_model_loading_code():
    edges = graph()
    bad = {m: sorted(t for t in edges[m] if wing(t) == "loading") for m in edges if wing(m) == "offload"}
    assert not any(bad.values()), f"edgespec/offload imports model loading: {bad}"


def test_the_loading_path_flows_one_way():
    """resolve → tensors → skeleton → convert → models → loader: none imports one after it."""
    order = ["edgespec.loading.resolve", "edgespec.loading.tensors", "edgespec.loading.skeleton",
             "edgespec.loading.convert", "edgespec.loading.bnb_copy", "edgespec.loading.models", "edgespec.loading.loader"]
    edges = graph()
    for i, mod in enumerate(order):
        later = set(order[i + 1 :]) | {"edgespec.engine.engine", "edgespec.front.cli"}
        assert not edges[mod] & later, f"{mod} imports {sorted(edges[mod] & later)}"
