"""GGUF weight blocks de-quantized in torch, on any device, into an output view.

A quantized GGUF matrix is stored row by row, each row `cols / block` whole blocks of `size` bytes
(a block: fp16 scales and packed integer codes). `decode_into(data, kind, out)` turns the uint8 bytes
of whole blocks into `out` (any float dtype, as many elements as the blocks hold) with shifts, masks
and scales over all blocks at once (a few large steps bound the temporaries, never a loop over
blocks). The values are those of gguf-py's numpy reference (`gguf.quants.dequantize`) bit for bit:
each float operation below is the one the reference does, in the same order and in fp32 (integer
codes become floats exactly, and no two float operations are fused into one rounding); a non-fp32
`out` receives the fp32 values cast once, as transformers casts its de-quantized copy. This is the CPU
path: on CUDA one fused Triton kernel per tensor (edgespec/offload/kernels/gguf.py) writes the same
bits, and this code is its fallback when Triton is missing.

Decoded: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4, IQ4_NL,
IQ4_XS. The other I-quants (codebook grids) are not: `supported(kind)` says so before any load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from edgespec.offload import kernels

QK_K = 256  # weights per K-quant super-block
# weights decoded per step: bounds the temporaries (~4 fp32 copies of a step); on a GPU each step is
# ~10 kernel launches on the host's critical path, so steps are bigger there
STEP_WEIGHTS = {"cpu": 1 << 20, "cuda": 1 << 24}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled
FP16_FIELDS = {  # byte offsets of each block's fp16 scales, per type (random blocks need finite ones there)
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,), "MXFP4": (),
}


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type: `block` weights in `size` bytes, and its decoder (None: a plain float)."""

    name: str
    block: int
    size: int
    decode: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # (blocks (n, size) uint8, out (n, block) fp32)
    dtype: torch.dtype | None = None  # plain float types: the element type as stored


def supported(kind: str) -> bool:
    return kind in TYPES


def nbytes(kind: str, numel: int) -> int:
    """Bytes that `numel` weights of type `kind` take in the file (numel: whole blocks)."""
    t = TYPES[kind]
    return numel // t.block * t.size


def decode_into(data: torch.Tensor, kind: str, out: torch.Tensor, fused: bool | None = None) -> None:
    """De-quantize the contiguous uint8 `data` (whole blocks of `kind`) into `out` (same device): the
    fused kernel on CUDA, the torch steps below elsewhere. `fused`: True forces the kernel (on any
    device: Triton's interpreter on a CPU), False the torch steps."""
    t = TYPES[kind]
    flat = out.view(-1)
    if t.decode is None:  # a plain float type: one cast
        flat.copy_(data.view(t.dtype).view(-1))
        return
    use_kernel = kernels.wanted(out) if fused is None else fused
    if use_kernel and kernels.gguf_into(data, kind, out, table(kind, out.device)):
        return
    if fused:
        raise RuntimeError(f"the fused {kind} decode did not run: {kernels.unavailable_reason()}")
    blocks = data.view(-1, t.size)
    step = max(1, STEP_WEIGHTS.get(out.device.type, STEP_WEIGHTS["cpu"]) // t.block)
    direct = out.dtype == torch.float32
    for a in range(0, blocks.shape[0], step):
        part = blocks[a : a + step]
        dst = flat[a * t.block : (a + part.shape[0]) * t.block].view(-1, t.block)
        tmp = dst if direct else torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
        t.decode(part, tmp)
        if not direct:
            dst.copy_(tmp)


# ---- shared pieces -----------------------------------------------------------------------------
_CONSTS: dict[tuple, torch.Tensor] = {}


def _const(values: tuple, device: torch.device, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A small constant table on `device`, made once (not a host copy per decode)."""
    key = (values, str(device), dtype)
    if key not in _CONSTS:
        _CONSTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTS[key]


def prepare(device: torch.device) -> None:
    """Make every constant table on `device` now, outside the copy path."""
    _const(tuple(range(0, 16, 2)), device, torch.int32)
    _const(IQ4_VALUES, device, torch.float32)
    _const(MXFP4_VALUES, device, torch.float32)


def table(kind: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 values `kind`'s codes index (IQ4 for the types without a table: the kernels take one)."""
    return _const(MXFP4_VALUES if kind == "MXFP4" else IQ4_VALUES, device, torch.float32)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block, as an (n, 1) fp32 column."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _split(q: torch.Tensor, group: int, shifts: tuple, mask: int) -> torch.Tensor:
    """Bytes (n, k) viewed as (n, k / group, 1, group), shifted by each of `shifts`, masked:
    (n, k / group, len(shifts), group) — the reference's reshape-shift-mask, dimension for dimension
    (one scalar shift per part: a broadcast shift by a tensor of shifts is several times slower)."""
    q = q.reshape(q.shape[0], -1, 1, group)
    return torch.cat([(q >> s) & mask if s else q & mask for s in shifts], dim=2)


def _bits(q: torch.Tensor) -> torch.Tensor:
    """The 32 bits of a little-endian 4-byte field per block, bit j at column j: (n, 32)."""
    return _split(q, 1, tuple(range(8)), 1).reshape(q.shape[0], 32)


def _lookup(table: tuple, codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of a 16-entry table at 4-bit `codes` (the tables hold small integers: exact)."""
    values = _const(table, codes.device, torch.float32)
    return values.index_select(0, codes.reshape(-1).int()).view(codes.shape)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes → two (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# ---- the block types ---------------------------------------------------------------------------
def _q8_0(b, out):
    torch.mul(b[:, 2:].view(torch.int8).float(), _f16(b, 0), out=out)


def _q4_0(b, out):
    q = _split(b[:, 2:], 16, (0, 4), 0x0F).reshape(b.shape[0], 32)
    torch.mul(_f16(b, 0), q.float() - 8, out=out)


def _q4_1(b, out):
    q = _split(b[:, 4:], 16, (0, 4), 0x0F).reshape(b.shape[0], 32)
    torch.mul(_f16(b, 0), q.float(), out=out)
    out.add_(_f16(b, 2))


def _q5(b, at: int) -> torch.Tensor:
    """Q5_0 / Q5_1 codes: 4 low bits from the nibbles after byte `at` + 4, the 5th from 4 bytes at `at`."""
    ql = _split(b[:, at + 4 :], 16, (0, 4), 0x0F).reshape(b.shape[0], 32)
    return ql | (_bits(b[:, at : at + 4]) << 4)


def _q5_0(b, out):
    torch.mul(_f16(b, 0), _q5(b, 2).float() - 16, out=out)


def _q5_1(b, out):
    torch.mul(_f16(b, 0), _q5(b, 4).float(), out=out)
    out.add_(_f16(b, 2))


def _q2_k(b, out):
    n, scales = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _split(b[:, 16:80], 32, (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    o = out.view(n, 16, 16)
    torch.mul(dl, q, out=o)
    o.sub_(ml)


def _q3_k(b, out):
    n, s = b.shape[0], b[:, 96:108]
    low = _split(s[:, :8], 8, (0, 4), 0x0F).reshape(n, 16)  # (n, 1, 8) >> (1, 2, 1) in the reference
    high = _split(s[:, 8:12], 4, (0, 2, 4, 6), 0x03).reshape(n, 16)
    dl = (_f16(b, 108) * ((low | (high << 4)).float() - 32)).view(n, 16, 1)
    ql = _split(b[:, 32:96], 32, (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = (_split(b[:, :32], 32, tuple(range(8)), 1).reshape(n, 16, 16)) ^ 1  # offset 4 where the bit is 0
    torch.mul(dl, ql.float() - (qh << 2).float(), out=out.view(n, 16, 16))


def _q4_k(b, out):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    q = _split(b[:, 16:], 32, (0, 4), 0x0F).reshape(n, 8, 32).float()
    o = out.view(n, 8, 32)
    torch.mul(d, q, out=o)
    o.sub_(dm)


def _q5_k(b, out):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).view(n, 8, 1)
    ql = _split(b[:, 48:], 32, (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _split(b[:, 16:48], 32, tuple(range(8)), 1).reshape(n, 8, 32)
    o = out.view(n, 8, 32)
    torch.mul(d, (ql | (qh << 4)).float(), out=o)
    o.sub_(dm)


def _q6_k(b, out):
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _split(b[:, :128], 64, (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _split(b[:, 128:192], 32, (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).float() - 32).view(n, 16, 16)
    torch.mul(d, q, out=out.view(n, 16, 16))


def _mxfp4(b, out):
    e = b[:, 0:1].int()  # e8m0 exponent, halved (ggml_e8m0_to_fp32_half)
    d = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23).view(torch.float32)
    q = _split(b[:, 1:], 16, (0, 4), 0x0F).reshape(b.shape[0], 32)
    torch.mul(d, _lookup(MXFP4_VALUES, q), out=out)


def _iq4_nl(b, out):
    q = _split(b[:, 2:], 16, (0, 4), 0x0F).reshape(b.shape[0], 32)
    torch.mul(_f16(b, 0), _lookup(IQ4_VALUES, q), out=out)


def _iq4_xs(b, out):
    n = b.shape[0]
    high = b[:, 2:3].int() | (b[:, 3:4].int() << 8)  # a little-endian uint16 of 2-bit high scale parts
    high = (high >> _const(tuple(range(0, 16, 2)), b.device, torch.int32).view(1, 8)) & 3
    low = _split(b[:, 4:8], 1, (0, 4), 0x0F).reshape(n, 8)
    dl = (_f16(b, 0) * ((low.int() | (high << 4)).float() - 32)).view(n, 8, 1)
    q = _split(b[:, 8:], 16, (0, 4), 0x0F).reshape(n, 8, 32)
    torch.mul(dl, _lookup(IQ4_VALUES, q), out=out.view(n, 8, 32))


TYPES = {t.name: t for t in (
    BlockType("F32", 1, 4, dtype=torch.float32),
    BlockType("F16", 1, 2, dtype=torch.float16),
    BlockType("BF16", 1, 2, dtype=torch.bfloat16),
    BlockType("Q4_0", 32, 18, _q4_0),
    BlockType("Q4_1", 32, 20, _q4_1),
    BlockType("Q5_0", 32, 22, _q5_0),
    BlockType("Q5_1", 32, 24, _q5_1),
    BlockType("Q8_0", 32, 34, _q8_0),
    BlockType("Q2_K", QK_K, 84, _q2_k),
    BlockType("Q3_K", QK_K, 110, _q3_k),
    BlockType("Q4_K", QK_K, 144, _q4_k),
    BlockType("Q5_K", QK_K, 176, _q5_k),
    BlockType("Q6_K", QK_K, 210, _q6_k),
    BlockType("MXFP4", 32, 17, _mxfp4),
    BlockType("IQ4_NL", 32, 18, _iq4_nl),
    BlockType("IQ4_XS", QK_K, 136, _iq4_xs),
)}
