"""Files edgespec writes: its cache folder, and writes that appear whole or not at all."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """~/.cache/edgespec, or $EDGESPEC_CACHE."""
    return Path(os.environ.get("EDGESPEC_CACHE", Path.home() / ".cache" / "edgespec"))


def write_file(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file renamed into place (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary folder beside `out` and rename it into place (kept if another
    process got there first); a failure leaves no partial folder and is raised."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if not out.exists():
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
