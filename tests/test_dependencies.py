"""Every third-party package edgespec imports is a declared runtime dependency, or an optional one whose
absence ends in an EdgespecError naming the `pip install` (read from the source with ast: no imports run)."""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgespec"
# optional features: the module that imports it, and the install hint its EdgespecError (triton: its
# warning before the torch decode takes over) must carry
OPTIONAL = {"matplotlib": ("front/profile.py", "pip install"), "hqq": ("loading/lowbit.py", "pip install"),
            "triton": ("offload/kernels/__init__.py", "pip install")}


def imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"edgespec", "__future__"}


def declared(extra: str | None = None) -> set[str]:
    """Distribution names in pyproject's dependencies (or in one optional extra), normalised."""
    text = (ROOT / "pyproject.toml").read_text()
    block = (re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M) if extra is None
             else re.search(rf"^{extra} = \[(.*?)\]", text, re.S | re.M))
    return {_norm(re.split(r"[<>=!\[ ;]", d)[0]) for d in re.findall(r'"([^"]+)"', block.group(1))}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_runtime_import_is_a_declared_dependency():
    dists = packages_distributions()
    runtime = declared()
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        for mod in imported_top_level(path):
            if mod in OPTIONAL:
                continue
            names = {_norm(d) for d in dists.get(mod, [mod])}
            if not names & runtime:
                missing.setdefault(mod, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_optional_imports_fail_with_the_install_command():
    for mod, (where, hint) in OPTIONAL.items():
        text = (PACKAGE / where).read_text()
        assert f"import {mod}" in text and "except ImportError" in text and hint in text, mod
        assert _norm(mod) in declared("plot") | declared("hqq") | declared("test"), mod


def test_transformers_needs_accelerate_for_the_drafter():
    """Nothing in edgespec imports accelerate, but loading the bitsandbytes drafter with a device_map makes
    transformers import it: it must be a runtime dependency (the quick start died without it once)."""
    assert "accelerate" in declared()
