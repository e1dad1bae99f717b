"""GGUF → de-quantized safetensors folder, one decoder layer at a time.

transformers reads a GGUF by de-quantizing every tensor into memory at once (fp32: 4 bytes per
weight, 280 GB for a 70B). Here each tensor is de-quantized exactly as transformers does it (gguf's
`dequantize`, then the architecture's tensor processor, e.g. Llama's q/k un-permutation), and each
decoder layer is written to its own safetensors shard before the next is read, so host RAM holds
one layer at a time. The folder (config, generation config, tokenizer, sharded weights with an
index) loads with transformers' `from_pretrained` and layer by layer (offload/checkpoint.py).
Architectures whose processors rename or merge tensors (MoE, GPT-2, ...) raise `Unsupported`, and
the caller converts them whole through transformers instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


class Unsupported(Exception):
    """This GGUF cannot be converted layer by layer (the message says why)."""


class GGUFTensors:
    """The tensors of a GGUF file under transformers' names, de-quantized on request."""

    def __init__(self, path: str, skeleton: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor, get_gguf_hf_weights_map, read_field,
        )

        reader = GGUFReader(path)
        arch = read_field(reader, "general.architecture")[0]
        kind = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if kind not in (TensorProcessor, LlamaTensorProcessor):  # the others rename or merge tensors
            raise Unsupported(f"GGUF architecture {arch} needs transformers' whole-file conversion")
        self.processor = kind(config=skeleton.config.to_dict())  # parsed from this GGUF's metadata already
        try:
            to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        except (NotImplementedError, KeyError, ValueError) as err:  # an architecture gguf-py cannot name
            raise Unsupported(f"GGUF tensor names not mapped: {err}") from None
        self.tensors = {to_hf[t.name]: t for t in reader.tensors if t.name in to_hf}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        import numpy as np

        out = {}
        for name in names:
            t = self.tensors[name]
            weights = self.processor.process(weights=_dequantize(t.data, t.tensor_type), name=t.name).weights
            if not (weights.flags.writeable and weights.flags.c_contiguous):  # a view of the mapped file
                weights = np.copy(weights)
            out[name] = torch.from_numpy(weights).to(dtype)  # de-quantized in fp32, then cast, as transformers does
        return out


def _dequantize(data, kind, rows: int = 4096):
    """gguf's `dequantize`, `rows` rows at a time into one output array (quantization blocks never
    span rows, so the values are the same): its temporaries stay small for a large embedding."""
    import numpy as np
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, kind)
    first = dequantize(data[:rows], kind)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], kind)
    return out


def convert_gguf(folder: str, gguf: str, out: Path, progress: bool = True, dtype: torch.dtype = torch.float32) -> None:
    """Write the de-quantized model of `folder/gguf`, in `dtype`, into the new folder `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = GGUFTensors(str(Path(folder) / gguf), skeleton)
    groups = _shards(skeleton, source)
    out.mkdir(parents=True)
    config.dtype, config.architectures = dtype, [type(skeleton).__name__]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    _write(source, groups, out, progress, dtype)


def _shards(skeleton: nn.Module, source: GGUFTensors) -> list[list[str]]:
    """Tensor names per shard: everything outside the decoder layers, then one shard per layer."""
    names = list(skeleton.state_dict(keep_vars=True))
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
    missing = [k for k in names if k not in source and not (tied and k == "lm_head.weight")]
    if missing:
        raise Unsupported(f"the GGUF has no tensor for {missing[0]}")
    from edgespec.offload.checkpoint import layer_prefix

    prefix = layer_prefix(skeleton)
    if prefix is None:
        raise Unsupported("its decoder layers are not at model.get_decoder().layers")
    n = len(skeleton.get_decoder().layers)
    per_layer = [[k for k in names if k.startswith(f"{prefix}.{i}.")] for i in range(n)]
    inside = {k for group in per_layer for k in group}
    outside = [k for k in names if k not in inside and k in source]
    return [outside, *per_layer]


def _write(source: GGUFTensors, groups: list[list[str]], out: Path, progress: bool, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    bar = tqdm(groups, desc="edgespec: de-quantizing the GGUF", unit="shard", disable=not progress)
    for i, names in enumerate(bar):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = source.read(names, dtype)
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
