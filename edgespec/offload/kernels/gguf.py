"""GGUF weight blocks decoded by one Triton kernel launch per tensor.

A program decodes `BLOCKS` whole blocks: a (BLOCKS, QK) tile, one lane per weight. Each lane reads the
byte holding its code and the scale fields of its (sub-)block (bytes several lanes share come from
the cache, the packed blocks cross memory once), computes its value in fp32 as the reference does and
stores it once, in the slot's dtype. Byte layouts (offsets within a block; j = weight in the block):

- 32-weight blocks: Q4_0 fp16 d, 16 nibble bytes (weight j: byte j % 16, high nibble when j >= 16),
  d * (q - 8); Q4_1 adds an fp16 m after d: d * q + m; Q5_0 / Q5_1 put 4 bytes of fifth bits (bit j)
  before the nibbles: d * (q - 16), d * q + m; Q8_0: fp16 d, 32 int8: x * d; IQ4_NL: fp16 d,
  nibbles, d * table[q]; MXFP4: one e8m0 exponent byte (half of 2^(e - 127)), nibbles, d * table[q].
- 256-weight super-blocks: Q2_K 16 scale bytes (low nibble scale, high nibble min per 16 weights),
  64 bytes of 2-bit codes (byte 16 + 32 * (j // 128) + j % 32, shift 2 * (j % 128 // 32)), fp16 d
  and dmin: (d * sc) * q - dmin * m; Q3_K 32 bytes of high-bit masks (bit j // 32 of byte j % 32,
  offset 4 where it is 0), 64 bytes of 2-bit codes as Q2_K, 12 bytes of 6-bit scales (low nibbles
  in bytes 0-7, high pairs in 8-11), fp16 d: (d * (s - 32)) * q; Q4_K / Q5_K: fp16 d and dmin, 12
  bytes of eight 6-bit scales and mins, (Q5_K: 32 bytes of fifth bits,) 128 nibble bytes (byte
  32 * (j // 64) + j % 32, high nibble when j % 64 >= 32): (d * sc) * q - dmin * m; Q6_K 128 nibble
  bytes (byte 64 * (j // 128) + j % 64, high when j % 128 >= 64), 64 bytes of 2-bit high parts, 16
  int8 scales, fp16 d: (d * s) * (q - 32); IQ4_XS: fp16 d, a uint16 of 2-bit high scale parts, 4
  bytes of low scale nibbles, 128 nibble bytes by 32-weight groups: (d * (s - 32)) * table[q].
"""
from __future__ import annotations

import triton
import triton.language as tl

from edgespec.offload.kernels.parts import byte, half, jit, signed_byte, store, tile

# name -> (KIND constexpr, weights per block, bytes per block, blocks per program)
LAYOUTS = {
    "Q4_0": (0, 32, 18, 64), "Q4_1": (1, 32, 20, 64), "Q5_0": (2, 32, 22, 64), "Q5_1": (3, 32, 24, 64),
    "Q8_0": (4, 32, 34, 64), "MXFP4": (5, 32, 17, 64), "IQ4_NL": (6, 32, 18, 64),
    "Q2_K": (7, 256, 84, 8), "Q3_K": (8, 256, 110, 8), "Q4_K": (9, 256, 144, 8), "Q5_K": (10, 256, 176, 8),
    "Q6_K": (11, 256, 210, 8), "IQ4_XS": (12, 256, 136, 8),
}


@jit
def _nibble(b, at, j, ok, SPAN: tl.constexpr):
    """4-bit code of weight j: byte at + j % SPAN, low nibble for j < SPAN (within 2 * SPAN weights)."""
    return (byte(b, at + j % SPAN, ok) >> (4 * ((j // SPAN) % 2))) & 15


@jit
def _crumb(b, at, j, ok):
    """2-bit code of weight j of 128: byte at + j % 32, shift 2 * (j // 32)."""
    return (byte(b, at + j % 32, ok) >> (2 * ((j % 128) // 32))) & 3


@jit
def _bit(b, at, j, ok):
    """Bit j of the little-endian bit field at byte `at`: bit j % 8 of byte at + j // 8."""
    return (byte(b, at + j // 8, ok) >> (j % 8)) & 1


@jit
def _plane(b, at, j, ok):
    """The K-quants' high-bit planes: bit j // 32 of byte at + j % 32."""
    return (byte(b, at + j % 32, ok) >> (j // 32)) & 1


@jit
def _k_scale_min(b, i, ok):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block i (of 8) from the 12 bytes at offset 4."""
    lo, mn, hi = byte(b, 4 + i % 4, ok), byte(b, 8 + i % 4, ok), byte(b, 12 + i % 4, ok)
    sc = tl.where(i < 4, lo & 63, (hi & 15) | ((lo >> 2) & 48))
    m = tl.where(i < 4, mn & 63, (hi >> 4) | ((mn >> 2) & 48))
    return sc, m


@jit
def _value(b, j, ok, table, KIND: tl.constexpr):
    """fp32 value of weight j (1, QK) of each block b (BLOCKS, 1) points at."""
    if KIND == 0:  # Q4_0
        v = half(b, 0, ok) * (_nibble(b, 2, j, ok, 16) - 8).to(tl.float32)
    elif KIND == 1:  # Q4_1
        v = half(b, 0, ok) * _nibble(b, 4, j, ok, 16).to(tl.float32) + half(b, 2, ok)
    elif KIND == 2:  # Q5_0
        q = _nibble(b, 6, j, ok, 16) | (_bit(b, 2, j, ok) << 4)
        v = half(b, 0, ok) * (q - 16).to(tl.float32)
    elif KIND == 3:  # Q5_1
        q = _nibble(b, 8, j, ok, 16) | (_bit(b, 4, j, ok) << 4)
        v = half(b, 0, ok) * q.to(tl.float32) + half(b, 2, ok)
    elif KIND == 4:  # Q8_0
        v = signed_byte(b, 2 + j, ok).to(tl.float32) * half(b, 0, ok)
    elif KIND == 5:  # MXFP4: e8m0 exponent, halved (2^(e-128) as fp32 bits; e < 2: subnormal)
        e = byte(b, 0, ok)
        d = tl.where(e < 2, 0x00200000 * (e + 1), (e - 1) << 23).to(tl.float32, bitcast=True)
        v = d * tl.load(table + _nibble(b, 1, j, ok, 16))
    elif KIND == 6:  # IQ4_NL
        v = half(b, 0, ok) * tl.load(table + _nibble(b, 2, j, ok, 16))
    elif KIND == 7:  # Q2_K
        s = byte(b, j // 16, ok)
        dl = half(b, 80, ok) * (s & 15).to(tl.float32)
        ml = half(b, 82, ok) * (s >> 4).to(tl.float32)
        v = dl * _crumb(b, 16 + 32 * (j // 128), j, ok).to(tl.float32) - ml
    elif KIND == 8:  # Q3_K
        i = j // 16
        low = (byte(b, 96 + i % 8, ok) >> (4 * (i // 8))) & 15
        s = low | (((byte(b, 104 + i % 4, ok) >> (2 * (i // 4))) & 3) << 4)
        dl = half(b, 108, ok) * (s - 32).to(tl.float32)
        q = _crumb(b, 32 + 32 * (j // 128), j, ok) - ((_plane(b, 0, j, ok) ^ 1) << 2)
        v = dl * q.to(tl.float32)
    elif KIND == 9 or KIND == 10:  # Q4_K, Q5_K
        sc, m = _k_scale_min(b, j // 32, ok)
        dl = half(b, 0, ok) * sc.to(tl.float32)
        ml = half(b, 2, ok) * m.to(tl.float32)
        if KIND == 9:
            q = _nibble(b, 16 + 32 * (j // 64), j, ok, 32)
        else:
            q = _nibble(b, 48 + 32 * (j // 64), j, ok, 32) | (_plane(b, 16, j, ok) << 4)
        v = dl * q.to(tl.float32) - ml
    elif KIND == 11:  # Q6_K
        dl = half(b, 208, ok) * signed_byte(b, 192 + j // 16, ok).to(tl.float32)
        q = _nibble(b, 64 * (j // 128), j % 128, ok, 64) | (_crumb(b, 128 + 32 * (j // 128), j, ok) << 4)
        v = dl * (q - 32).to(tl.float32)
    else:  # IQ4_XS
        i = j // 32
        high = byte(b, 2, ok) | (byte(b, 3, ok) << 8)
        s = ((byte(b, 4 + i // 2, ok) >> (4 * (i % 2))) & 15) | (((high >> (2 * i)) & 3) << 4)
        dl = half(b, 0, ok) * (s - 32).to(tl.float32)
        v = dl * tl.load(table + _nibble(b, 8 + 16 * i, j % 32, ok, 16))
    return v


@jit
def gguf_kernel(src, dst, table, n_blocks, KIND: tl.constexpr, QK: tl.constexpr, SIZE: tl.constexpr,
                BLOCKS: tl.constexpr, OUT: tl.constexpr):
    """Blocks [pid * BLOCKS, pid * BLOCKS + BLOCKS) of `src` (uint8) into `dst` (QK weights each)."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    j = tl.arange(0, QK)[None, :]
    ok = blk < n_blocks
    v = _value(src + blk * SIZE, j, ok, table, KIND)
    store(dst + blk * QK + j, v, ok & (j < QK), OUT)


def launch(data, kind: str, out, table, out_kind: int) -> None:
    """Decode the uint8 `data` (whole blocks of `kind`) into the contiguous `out` (or its int16 view)."""
    code, qk, size, blocks = LAYOUTS[kind]
    n = data.numel() // size
    if n == 0:
        return
    blocks = tile(blocks, triton.cdiv(n, blocks))
    gguf_kernel[(triton.cdiv(n, blocks),)](data, out, table, n, KIND=code, QK=qk, SIZE=size, BLOCKS=blocks,
                                           OUT=out_kind, num_warps=4, enable_fp_fusion=False)
