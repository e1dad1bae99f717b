"""GGUF blocks de-quantized in torch (edgespec/offload/gguf_blocks.py) are gguf-py's numpy reference
(`gguf.quants.dequantize`) bit for bit, for every type decoded, on random valid blocks and on
`gguf.quants.quantize` of random weights, for row counts that are not a multiple of a power of two."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from edgespec.offload import gguf_blocks
from edgespec.offload.gguf_blocks import TYPES, decode_into

FP16_FIELDS = {  # byte offsets of each block's fp16 scales (random bytes there could be NaN / inf)
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "MXFP4": [],
}
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "BF16", "F16"]
LISTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
          "MXFP4", "IQ4_NL", "IQ4_XS"]


def shape_of(kind: str, rows: int) -> tuple[int, int]:
    block = TYPES[kind].block
    return rows, block * 3 if block > 1 else 45


def random_blocks(kind: str, rows: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) uint8: random codes, random finite fp16 scales (normal, small, subnormal, 0)."""
    rng, t = np.random.default_rng(seed), TYPES[kind]
    _, cols = shape_of(kind, rows)
    if t.decode is None:  # plain floats: random finite values of that type
        vals = (rng.standard_normal(rows * cols) * rng.choice([1e-3, 1.0, 1e3], rows * cols)).astype(np.float32)
        data = {"F32": vals, "F16": vals.astype(np.float16)}.get(kind)
        data = quantize(vals, Q.BF16) if data is None else data
        return np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    n = rows * cols // t.block
    raw = rng.integers(0, 256, size=(n, t.size), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        scale = rng.standard_normal(n) * rng.choice([1e-2, 1.0, 1e-6, 0.0], n)
        raw[:, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def ours(raw: np.ndarray, kind: str, shape, dtype=torch.float32) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    decode_into(torch.from_numpy(raw.copy()).reshape(-1), kind, out)
    return out


def reference(raw: np.ndarray, kind: str) -> torch.Tensor:
    with np.errstate(over="ignore"):  # MXFP4's largest exponents overflow to inf, in both
        return torch.from_numpy(np.ascontiguousarray(dequantize(raw, Q[kind]), dtype=np.float32))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_every_listed_type_is_decoded():
    assert all(gguf_blocks.supported(k) for k in LISTED)
    assert not gguf_blocks.supported("IQ2_XXS") and not gguf_blocks.supported("IQ3_S")


@pytest.mark.parametrize("kind", LISTED)
@pytest.mark.parametrize("rows", [1, 37])
def test_random_valid_blocks_decode_bit_identically(kind, rows):
    rows = rows if TYPES[kind].block < 256 else rows // 5 + 2  # K-quants: 2 or 9 rows of 3 super-blocks
    raw = random_blocks(kind, rows, seed=rows)
    assert same_bits(ours(raw, kind, shape_of(kind, rows)), reference(raw, kind))


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_quantized_random_weights_decode_bit_identically(kind):
    rows, cols = 37, 96
    w = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(quantize(w, Q[kind])).view(np.uint8).reshape(rows, -1)
    assert same_bits(ours(raw, kind, (rows, cols)), reference(raw, kind))


@pytest.mark.parametrize("kind", ["Q4_1", "Q6_K", "F16"])
def test_cast_once_to_the_run_dtype(kind):
    """A bf16 slot gets the fp32 values cast once (as the de-quantized copy is cast)."""
    raw = random_blocks(kind, 9)
    assert torch.equal(ours(raw, kind, shape_of(kind, 9), torch.bfloat16), reference(raw, kind).to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["Q5_1", "Q4_K"])
def test_decode_does_not_depend_on_its_step(kind, monkeypatch):
    """Decoding in steps of a few blocks (with a remainder) writes the same values as one step."""
    raw = random_blocks(kind, 11)
    whole = ours(raw, kind, shape_of(kind, 11))
    monkeypatch.setitem(gguf_blocks.STEP_WEIGHTS, "cpu", TYPES[kind].block * 4)
    assert same_bits(ours(raw, kind, shape_of(kind, 11)), whole)
