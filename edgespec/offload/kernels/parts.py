"""Pieces every decode kernel uses (Triton device functions): bytes and fp16 fields read out of packed
blocks, and the store of fp32 values into a slot of any float dtype.

Values are computed in fp32 with the reference's operations in its order (the kernels are launched
with `enable_fp_fusion=False`, so no multiply and add become one FMA rounding). The fp32 → bf16 store
rounds to nearest-even in integer arithmetic, NaN to the quiet NaN 0x7FC0, as torch's cast does:
Triton's own cast rounds that way on a GPU but truncates in its interpreter, and the two must agree.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

OUT_F32, OUT_BF16, OUT_F16 = 0, 1, 2  # the slot's dtype, a constexpr of every kernel


def interpreted() -> bool:
    """Whether the kernels run through Triton's interpreter (no CUDA here, or TRITON_INTERPRET=1)."""
    return not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETER_PROGRAMS = 32  # the interpreter runs programs one by one: big launches there get bigger tiles


def tile(size: int, programs: int) -> int:
    """`size` (a power of two) for compiled kernels; in the interpreter, doubled until a launch of
    `programs` tiles of `size` has at most INTERPRETER_PROGRAMS (same values: tiles only split the work)."""
    while interpreted() and programs > INTERPRETER_PROGRAMS:
        size, programs = size * 2, (programs + 1) // 2
    return size


def jit(fn):
    """`triton.jit`, defined for the interpreter where there is no CUDA (Triton reads TRITON_INTERPRET
    when a function is defined: it is set for the definition and restored after)."""
    with _interpreter(interpreted()):
        return triton.jit(fn)


@contextlib.contextmanager
def _interpreter(on: bool):
    before = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


@jit
def byte(base, at, ok):
    """The uint8 at byte offset `at` of each block `base` points at, as int32 (0 where `ok` is False)."""
    return tl.load(base + at, mask=ok, other=0).to(tl.int32)


@jit
def signed_byte(base, at, ok):
    """The int8 at byte offset `at`, sign-extended to int32."""
    return tl.load(base + at, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@jit
def half(base, at, ok):
    """The little-endian fp16 at byte offset `at` (any alignment), as fp32 (exact)."""
    lo = tl.load(base + at, mask=ok, other=0).to(tl.uint16)
    hi = tl.load(base + at + 1, mask=ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@jit
def bf16_bits(v):
    """fp32 → bf16 bits, round to nearest-even (NaN → 0x7FC0), as int16."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@jit
def store(dst, v, ok, OUT: tl.constexpr):
    """fp32 values `v` into `dst` (fp32, an int16 view of bf16, or fp16), where `ok`."""
    if OUT == 1:
        tl.store(dst, bf16_bits(v), mask=ok)
    elif OUT == 2:
        tl.store(dst, v.to(tl.float16), mask=ok)
    else:
        tl.store(dst, v, mask=ok)
