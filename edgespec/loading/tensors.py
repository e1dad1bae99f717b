"""Tensor sources: a model's weights read a few tensors at a time, under transformers' names.

- `SafetensorsTensors`: the safetensors shards of a folder or hub id (a file is opened for one read).
- `GGUFTensors`: a GGUF file, memory-mapped. `read` de-quantizes exactly as transformers does (gguf-py's
  `dequantize`, then the architecture's tensor processor, e.g. Llama's q/k row un-permutation, then
  the cast); `raw` hands a tensor over as the bytes of its blocks, rows permuted once where the
  processor permutes rows (whole rows are whole blocks: contiguous byte ranges), for the streamer to
  decode on the device. The file's pages are released after each tensor, so the process keeps only
  what it was given, never the mapped file.

`Unsupported` says a model cannot be read this way (its architecture renames or merges tensors, or its
tensors are not where transformers looks): the caller then loads or converts it whole.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgespec.base.errors import ModelNotFoundError

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


class Unsupported(Exception):
    """This model cannot be read one tensor (or one layer) at a time; the message says why."""


class SafetensorsTensors:
    """The safetensors files of a model folder (or hub id), read a few tensors at a time."""

    def __init__(self, files: dict[str, str]):
        self.files = files  # tensor name -> file path

    @classmethod
    def find(cls, folder: str) -> "SafetensorsTensors | None":
        """The checkpoint of `folder`, or None when it has no safetensors weights."""
        from transformers.utils import cached_file

        index = cached_file(folder, INDEX, _raise_exceptions_for_missing_entries=False)
        if index:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            paths = {name: _shard(folder, name) for name in set(weight_map.values())}
            return cls({t: paths[name] for t, name in weight_map.items()})
        single = cached_file(folder, SINGLE, _raise_exceptions_for_missing_entries=False)
        return cls({t: single for t in _keys(single)}) if single else None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The named tensors, cast to the given dtypes. Files are opened for this call only, so the
        pages they map leave the process with it."""
        from safetensors import safe_open

        out, handles = {}, {}
        try:
            for name, dtype in names.items():
                path = self.files[name]
                try:
                    if path not in handles:
                        handles[path] = safe_open(path, framework="pt")
                    t = handles[path].get_tensor(name)
                except Exception as err:  # truncated or corrupt shard
                    raise ModelNotFoundError(f"Could not read {name} from {path}: {err}. The checkpoint file is "
                                             "damaged: download it again.") from None
                out[name] = t if t.dtype == dtype else t.to(dtype)
        finally:
            handles.clear()
        return out


def _shard(folder: str, name: str) -> str:
    from transformers.utils import cached_file

    try:
        path = cached_file(folder, name)
    except OSError as err:
        raise ModelNotFoundError(f"The checkpoint in {folder} lists the shard {name}, which is missing ({err}). "
                                 "Download the model again (every model-*.safetensors file).") from None
    _keys(path)  # reads the header only: a damaged shard is named now, not deep inside a load
    return path


def _keys(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise ModelNotFoundError(f"Could not read {path}: {err}. The checkpoint file is damaged: download it "
                                 "again.") from None


# ---- GGUF --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawTensor:
    """A GGUF tensor as the bytes of its blocks: `write(region)` copies its `nbytes` into a uint8
    host region (rows already in transformers' order)."""

    kind: str  # GGUF type name, e.g. "Q4_K"
    nbytes: int
    write: Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class _Info:
    """Where one tensor lies in the file, and the array GGUFReader would make of it."""

    name: str  # GGUF name
    kind: str
    qtype: object  # gguf.GGMLQuantizationType
    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple

    @classmethod
    def from_row(cls, row: list) -> "_Info":
        from gguf import GGMLQuantizationType

        name, kind, offset, nbytes, dtype, shape = row
        return cls(name, kind, GGMLQuantizationType[kind], offset, nbytes, np.dtype(dtype), tuple(shape))


class _Mapped:
    """A file mapped read-only; the pages read through it are released after each use (madvise), so
    they do not stay in this process's resident set (they stay in the page cache)."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def array(self, info: _Info) -> np.ndarray:
        count = info.nbytes // np.dtype(info.dtype).itemsize
        return np.frombuffer(self.map, dtype=info.dtype, count=count, offset=info.offset).reshape(info.shape)

    def release(self, info: _Info) -> None:
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
            self.map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)


class GGUFTensors:
    """The tensors of a GGUF file under transformers' names (`skeleton`: the model, on the meta device,
    whose config was parsed from this file's metadata)."""

    def __init__(self, path: str, skeleton: nn.Module, table: dict):
        if table.get("unsupported"):
            raise Unsupported(table["unsupported"])
        self.path, self.processor = path, _processor(table["architecture"], skeleton)
        to_hf = table["names"]
        infos = [_Info.from_row(row) for row in table["tensors"]]
        self.tensors = {to_hf[t.name]: t for t in infos if t.name in to_hf}
        self._file = _Mapped(path)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def kind(self, name: str) -> str:
        """The GGUF type of `name`, e.g. "Q4_K"."""
        return self.tensors[name].kind

    def gguf_name(self, name: str) -> str:
        return self.tensors[name].name

    def read(self, names: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The named tensors de-quantized as transformers does it: fp32, processed, then cast."""
        out = {}
        for name, dtype in names.items():
            info = self.tensors[name]
            weights = _dequantize(self._file.array(info), info.qtype)
            weights = self.processor.process(weights=weights, name=info.name).weights
            if not (weights.flags.writeable and weights.flags.c_contiguous):  # a view of the mapped file
                weights = np.copy(weights)
            out[name] = torch.from_numpy(weights).to(dtype)
            self._file.release(info)
        return out

    def raw(self, name: str) -> RawTensor | None:
        """`name` as the bytes of its blocks, or None where transformers' processor does more to it than
        permute its rows (it must then be read de-quantized)."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        probe = np.arange(rows).reshape(rows, 1)
        moved = np.asarray(self.processor.process(weights=probe.copy(), name=info.name).weights)
        if moved.shape != probe.shape or not np.array_equal(np.sort(moved[:, 0]), probe[:, 0]):
            return None
        order = None if np.array_equal(moved, probe) else np.ascontiguousarray(moved[:, 0])
        return RawTensor(info.kind, info.nbytes, partial(self._write_raw, info, order))

    def _write_raw(self, info: _Info, order: np.ndarray | None, region: torch.Tensor) -> None:
        src = self._file.array(info).view(np.uint8).reshape(-1)
        dst = region.numpy()
        if order is None:
            dst[:] = src
        else:  # transformers' row order, once, here: permuting rows permutes whole blocks
            np.take(src.reshape(len(order), -1), order, axis=0, out=dst.reshape(len(order), -1))
        self._file.release(info)


def gguf_table(path: str, skeleton: nn.Module | None) -> dict:
    """What a GGUF holds, read from its header (slow for a big vocabulary: gguf-py parses every field):
    its architecture, per tensor its name, type, byte offset and size and the array GGUFReader makes of
    it, and transformers' name of each tensor in `skeleton` (slow too: gguf-py rebuilds its name table
    for every module); `unsupported` says why it cannot be read per tensor. JSON-ready, to be kept."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(path)
    rows = [[t.name, t.tensor_type.name, int(t.data_offset), int(t.n_bytes), t.data.dtype.str, list(t.data.shape)]
            for t in reader.tensors]
    table = {"architecture": read_field(reader, "general.architecture")[0], "tensors": rows, "names": {},
             "unsupported": None if skeleton is not None else "its config names no decoder layer count"}
    try:
        if skeleton is not None:
            table["names"] = _hf_names(_processor(table["architecture"], skeleton), skeleton)
    except Unsupported as why:
        table["unsupported"] = str(why)
    return table


def _processor(arch: str, skeleton: nn.Module):
    """transformers' tensor processor for `arch`, where it only permutes rows (Llama) or does nothing."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor

    kind = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if kind not in (TensorProcessor, LlamaTensorProcessor):  # the others rename or merge tensors
        raise Unsupported(f"GGUF architecture {arch} needs transformers' whole-file conversion")
    return kind(config=skeleton.config.to_dict())  # parsed from this GGUF's metadata already


def _hf_names(processor, skeleton: nn.Module) -> dict[str, str]:
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    try:
        return get_gguf_hf_weights_map(skeleton, processor)
    except (NotImplementedError, KeyError, ValueError) as err:  # an architecture gguf-py cannot name
        raise Unsupported(f"GGUF tensor names not mapped: {err}") from None


def _dequantize(data, kind, rows: int = 4096):
    """gguf's `dequantize`, `rows` rows at a time into one output array (quantization blocks never
    span rows, so the values are the same): its temporaries stay small for a large embedding."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, kind)
    first = dequantize(data[:rows], kind)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], kind)
    return out
