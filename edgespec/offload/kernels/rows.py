"""The streamer's own codecs (edgespec/offload/codecs.py) decoded by one Triton launch per tensor.

- int8 rows: int8 codes (rows, cols) and one fp32 scale per row: q * scale[row], a (ROWS, COLS) tile
  per program, each code and scale read once.
- nf4 blocks: two 4-bit codes per byte (high nibble first) and one fp32 absmax per 64 weights:
  level[code] * absmax[block], a (BLOCKS, 64) tile per program. On CUDA bitsandbytes' own kernel
  decodes nf4 when it is installed; this one runs where it is not.
"""
from __future__ import annotations

import triton
import triton.language as tl

from edgespec.offload.kernels.parts import jit, store, tile

INT8_TILE = (16, 256)  # rows, columns per program
NF4_BLOCKS = 32  # 64-weight blocks per program


@jit
def int8_kernel(q, scale, dst, rows, cols, ROWS: tl.constexpr, COLS: tl.constexpr, OUT: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)[None, :]
    ok = (r < rows) & (c < cols)
    codes = tl.load(q + r * cols + c, mask=ok, other=0).to(tl.float32)
    v = codes * tl.load(scale + r, mask=r < rows, other=0.0)
    store(dst + r * cols + c, v, ok, OUT)


@jit
def nf4_kernel(codes, absmax, levels, dst, n_blocks, BLOCKS: tl.constexpr, OUT: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    w = tl.arange(0, 64)[None, :]
    ok = blk < n_blocks
    packed = tl.load(codes + blk * 32 + w // 2, mask=ok, other=0).to(tl.int32)
    level = tl.load(levels + ((packed >> (4 * (1 - w % 2))) & 15))
    v = level * tl.load(absmax + blk, mask=ok, other=0.0)
    store(dst + blk * 64 + w, v, ok & (w < 64), OUT)


def launch_int8(q, scale, out, out_kind: int) -> None:
    """int8 codes `q` (rows, cols) times their row's fp32 `scale` into `out` (or its int16 view)."""
    rows, cols = q.shape
    if q.numel() == 0:
        return
    r, c = INT8_TILE
    r = tile(r, triton.cdiv(rows, r) * triton.cdiv(cols, c))
    int8_kernel[(triton.cdiv(rows, r), triton.cdiv(cols, c))](q, scale, out, rows, cols, ROWS=r, COLS=c,
                                                              OUT=out_kind, num_warps=4, enable_fp_fusion=False)


def launch_nf4(codes, absmax, levels, out, out_kind: int) -> None:
    """nf4 `codes` (uint8, 32 per block) and fp32 `absmax` (one per block) into `out` (64 per block)."""
    n = absmax.numel()
    if n == 0:
        return
    blocks = tile(NF4_BLOCKS, triton.cdiv(n, NF4_BLOCKS))
    nf4_kernel[(triton.cdiv(n, blocks),)](codes, absmax, levels, out, n, BLOCKS=blocks, OUT=out_kind,
                                         num_warps=4, enable_fp_fusion=False)
