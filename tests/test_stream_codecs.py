"""Streamer codecs: tensors packed already encoded (GGUF blocks as in the file) decode in the slot to
the reference values; nf4's bytes are bitsandbytes' layout, so its kernel can decode them on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from edgespec.offload.layout import Encoded, LayerPack, make_slots
from edgespec.offload.codecs import GGUFRaw, NF4Blocks, nf4_codebook
from tests.conftest import tiny_model

KINDS = {"self_attn.q_proj.weight": "Q8_0", "self_attn.k_proj.weight": "Q4_0", "mlp.down_proj.weight": "Q5_1",
         "input_layernorm.weight": "F32"}


def encoded_layer(dtype=torch.float32):
    """A tiny Llama layer whose KINDS tensors are given as GGUF bytes (left meta), and their references."""
    layer = tiny_model("llama", 0, vocab=64, layers=1, hidden=64).model.layers[0].to(dtype)
    state = layer.state_dict()
    encoded, refs = {}, {}
    for name, kind in KINDS.items():
        w = state[name].float().numpy()
        raw = np.ascontiguousarray(quantize(w, Q[kind])).view(np.uint8).reshape(-1)
        refs[name] = torch.from_numpy(np.ascontiguousarray(dequantize(raw.reshape(w.shape[0], -1), Q[kind])))
        refs[name] = refs[name].reshape(w.shape).to(dtype)
        write = lambda region, raw=raw: region.copy_(torch.from_numpy(raw))  # noqa: E731
        encoded[name] = Encoded(GGUFRaw(kind), raw.nbytes, write)
        module, attr = name.rsplit(".", 1)
        setattr(layer.get_submodule(module), attr, torch.nn.Parameter(torch.empty_like(state[name], device="meta")))
    return layer, encoded, refs, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoded_tensors_decode_in_the_slot(dtype):
    layer, encoded, refs, state = encoded_layer(dtype)
    pack = LayerPack.pack(0, layer, encoded=encoded)
    raw_bytes = sum(e.nbytes for e in encoded.values())
    assert pack.staged and pack.codec is None and pack.host_bytes < pack.dense_bytes
    assert pack.host_bytes >= raw_bytes
    (slot,) = make_slots([pack], 1, torch.device("cpu"))
    pack.load(slot)
    pack.bind(slot)
    got = layer.state_dict()
    for name in state:  # encoded tensors: the reference decode; the others: as they were
        assert torch.equal(got[name], refs.get(name, state[name])), name
    pack.unbind()
    pack.restore(torch.device("cpu"))  # handle.remove(): encoded tensors come back decoded
    assert all(torch.equal(layer.state_dict()[n], refs.get(n, state[n])) for n in state)


def test_an_unknown_encoded_name_is_refused():
    layer, encoded, _, _ = encoded_layer()
    encoded["mlp.nope.weight"] = encoded.pop("mlp.down_proj.weight")
    with pytest.raises(KeyError, match="mlp.nope.weight"):
        LayerPack.pack(0, layer, encoded=encoded)


def test_nf4_bytes_are_bitsandbytes_layout():
    """Same levels, same codes and absmax as bitsandbytes' quantize_4bit, and bitsandbytes decodes
    our bytes — read with the arguments the CUDA path passes — to our weights bit for bit."""
    import bitsandbytes.functional as F

    assert torch.equal(nf4_codebook(), F.get_4bit_type("nf4", device="cpu"))
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(0)) * 0.05
    codec = NF4Blocks()
    region = torch.empty(codec.nbytes(w.shape), dtype=torch.uint8)
    codec.encode_into(w, region)
    codes, absmax = codec._parts(region, w.numel())
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(codes.reshape(-1), q.reshape(-1)) and torch.equal(absmax, state.absmax)
    for dtype in (torch.float32, torch.bfloat16):
        ours = torch.empty(w.shape, dtype=dtype)
        codec.decode_into(region, ours)
        same_call = F.QuantState(absmax=absmax, shape=ours.shape, dtype=dtype, blocksize=codec.block, quant_type="nf4")
        assert torch.equal(ours, F.dequantize_4bit(codes, same_call))


def test_nf4_takes_the_bitsandbytes_kernel_only_on_cuda():
    codec = NF4Blocks()
    codec.prepare(torch.device("cpu"))
    assert codec._kernel is None  # bitsandbytes has no out= kernel on the CPU: the torch decode runs
