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


# ---- private attributes ---------------------------------------------------------------------------
ADAPTER = "edgespec.base.reach"  # the one module allowed to touch torch's / transformers' private attributes


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(source: str) -> list[str]:
    """`obj._name` (and getattr/setattr/hasattr(obj, "_name")) in `source` where `_name` is not defined in
    that same source (a function, a class, or an attribute it assigns) and `obj` is not self or cls."""
    tree = ast.parse(source)
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_private_attributes_of_foreign_objects_only_in_the_adapter():
    bad = {name: hits for name, path in modules().items() if name != ADAPTER
           if (hits := private_reaches(path.read_text()))}
    assert not bad, f"private attributes touched outside {ADAPTER}: {bad}"


def test_the_private_attribute_check_catches_a_reach_in():
    assert private_reaches("def f(m):\n    return m._modules['x']\n") == ["line 2: ._modules"]
    assert private_reaches("def f(m):\n    return getattr(m, '_hf_hook', None)\n") == ["line 2: getattr(..., '_hf_hook')"]
    assert private_reaches("class A:\n    def f(self, o):\n        o._x = 1\n        return self._y, o._x\n") == []


# ---- what the front ends read from an engine ---------------------------------------------------------
def engine_reads(source: str) -> set[str]:
    """The attributes read off a name `engine` (or `self.engine`) in `source`."""
    reads = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "engine":
                reads.add(node.attr)
            elif isinstance(base, ast.Attribute) and base.attr == "engine" and isinstance(base.value, ast.Name):
                reads.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and node.args and ast.unparse(node.args[0]) in ("engine", "self.engine")):
            reads.add(f"{node.func.id}(engine, ...)")
    return reads


def test_front_ends_read_an_engine_only_through_the_front_end_protocol():
    from edgespec.engine.face import FrontEnd

    allowed = set(FrontEnd.__annotations__) | {n for n in vars(FrontEnd) if not n.startswith("_")}
    bad = {name: sorted(reads - allowed) for name, path in modules().items() if wing(name) == "front"
           if (reads := engine_reads(path.read_text())) - allowed}
    assert not bad, f"front ends reach past engine.face.FrontEnd: {bad}"
    assert engine_reads("def f(engine):\n    return getattr(engine, 'x', None), engine.conversation\n") == {
        "getattr(engine, ...)", "conversation"}


def test_the_engine_is_a_front_end():
    from conftest import tiny_engine
    from edgespec.engine.face import FrontEnd

    engine = tiny_engine(budget=2)
    assert isinstance(engine, FrontEnd)
    assert all(hasattr(engine, name) for name in FrontEnd.__annotations__)
