"""A drafter quantized once: bitsandbytes' nf4 / int8 copy is saved in edgespec's cache and loaded
from there the next time (on a CPU, quantizing SmolLM2-135M costs 5.3 s and loading its copy 0.5 s).

The copy is keyed by the source's files (path, size, mtime), the codec, the device type, the dtype
and the bitsandbytes version, so a changed model or setup quantizes afresh. A copy that cannot be
written or read is skipped (and a broken one deleted): the drafter is then quantized as before.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from edgespec.base.quiet import quiet_transformers
from edgespec.base.files import cache_dir, write_folder


def copy_path(folder: str, quantize: str, device: torch.device, dtype: torch.dtype) -> Path | None:
    """Where the quantized copy of the model in `folder` (a local folder or hub id) lives, or None
    when its files cannot be found."""
    source = _source_dir(folder)
    if source is None:
        return None
    import bitsandbytes

    setup = f"{quantize}:{device.type}:{dtype}:bnb{bitsandbytes.__version__}"
    key = hashlib.sha1(f"{_stamp(source)}|{setup}".encode()).hexdigest()[:12]
    return cache_dir() / "quantized" / f"{source.name}-{quantize}-{device.type}-{key}"


def source_stamp(folder: str) -> str | None:
    """The files the model in `folder` (a local folder or hub id) loads from — resolved path, names, sizes,
    mtimes — as one string for cache keys; None when they cannot be found."""
    source = _source_dir(folder)
    return None if source is None else _stamp(source)


def _stamp(source: Path) -> str:
    files = sorted(p for p in source.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return "|".join([str(source.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])


def load(path: Path | None, source: str, device: torch.device, dtype: torch.dtype):
    """The saved quantized copy of `source`, or None (no copy yet, or a broken one, now deleted)."""
    if path is None or not (path / "config.json").is_file():
        return None
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    except Exception:  # noqa: BLE001 — a damaged copy: quantize again
        shutil.rmtree(path, ignore_errors=True)
        return None
    model.config.name_or_path = source  # named as the model it was made from (calibration keys, stats)
    return model


def save(model, path: Path | None) -> None:
    """Save the quantized model for next time; any failure only means quantizing again next time."""
    if path is None:
        return
    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp)

    try:
        write_folder(path, write)
    except Exception:  # noqa: BLE001 — serialisation not supported here, disk full, ...
        pass


def _source_dir(folder: str) -> Path | None:
    path = Path(folder)
    if path.is_dir():
        return path
    try:  # a hub id: the snapshot folder from_pretrained read it from
        from transformers.utils import cached_file

        config = cached_file(folder, "config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001
        return None
    return Path(config).parent if config else None
