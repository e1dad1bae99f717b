"""Weight codecs for streamed layers: fewer bytes cross the host→device link, decoded on the device.

A codec turns one 2-D floating weight into a compact byte region (`encode_into`, once, computed on the
weight's own device, the bytes written wherever the region is: the host pack) and writes it back at the
weight's dtype into a slot view (`decode_into`, every pass, on the device). A codec's tables are made
on the device of the tensor they touch, on first use there. On CUDA the decode is one fused Triton
kernel per tensor (edgespec/offload/kernels/; bitsandbytes' kernel for nf4 when it is installed); the
torch decode here is the CPU path and the fallback, and the kernels give its values bit for bit.

- `Int8Rows`: per-output-row absmax int8, w ≈ q · scale[row], q ∈ [-127, 127], fp32 scales.
  ~1 byte per weight. Measured on random Llama-shaped layers: relative weight error ≈ 0.6 %
  (round-to-nearest on 255 levels); end-to-end logit error see tests/test_offload.py.
- `NF4Blocks`: 4-bit "normal float" codebook (16 quantiles of N(0, 1) scaled to [-1, 1]) with one
  fp32 absmax per block of 64 weights. ~0.56 bytes per weight, relative weight error ≈ 10 %. Its bytes
  are bitsandbytes' nf4 layout (`quantize_4bit(w, blocksize=64, quant_type="nf4",
  compress_statistics=False)`), so on CUDA bitsandbytes' own kernel decodes them into the slot in one
  launch; elsewhere the fused kernel or the torch decode here gives the same values.
- `GGUFRaw`: a GGUF tensor as it is in the file (edgespec/offload/gguf_blocks.py decodes its blocks);
  not a `--stream-quant` choice: the loader hands such tensors over already encoded.
"""
from __future__ import annotations

import torch

from edgespec.offload import gguf_blocks, kernels

ALIGN = 128  # byte alignment of every tensor inside a packed layer (and of parts inside a region)


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def typed(region: torch.Tensor, start: int, count: int, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """A `dtype` view of `count` elements at byte `start` of a uint8 region."""
    size = torch.empty((), dtype=dtype).element_size()
    view = region[start : start + count * size].view(dtype)
    return view.view(shape) if shape is not None else view


class Int8Rows:
    """Per-row absmax int8 codec for 2-D weights (one fp32 scale per output row)."""

    name = "int8"

    def applies(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() == 2 and t.numel() > 0

    def prepare(self, device: torch.device) -> None:
        """Nothing to stage on the device."""

    def nbytes(self, shape) -> int:
        rows, cols = shape
        return align(rows * cols) + rows * 4

    def _parts(self, region: torch.Tensor, shape):
        rows, cols = shape
        return typed(region, 0, rows * cols, torch.int8, shape), typed(region, align(rows * cols), rows, torch.float32)

    def encode_into(self, t: torch.Tensor, region: torch.Tensor) -> None:
        q, s = self._parts(region, t.shape)
        w = t.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q.copy_((w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8))
        s.copy_(scale)

    def decode_into(self, region: torch.Tensor, out: torch.Tensor, fused: bool | None = None) -> None:
        """`region` into `out` (same device): the fused kernel on CUDA (`fused`: True forces it, on any
        device; False the torch decode), else one torch multiply."""
        q, s = self._parts(region, out.shape)
        if (kernels.wanted(out) if fused is None else fused) and kernels.int8_into(q, s, out):
            return
        _check_unfused(fused, "int8")
        torch.mul(q, s[:, None], out=out)


# The 16 NF4 levels (QLoRA: quantiles of N(0, 1), 7 negative, 0, 8 positive, scaled to [-1, 1]) as
# the float32 values bitsandbytes' kernels hold them (`bitsandbytes.functional.get_4bit_type("nf4")`;
# a test checks they are equal), so the torch decode and bitsandbytes' kernel give the same weights.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, ascending, fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


class NF4Blocks:
    """4-bit normal-float codec: two codes per byte, one fp32 absmax per block of `block` weights.

    Its tables (the levels, the midpoints between them, the level pair of every byte) are made from
    NF4_LEVELS on first use on each device, on the device of the tensor they touch: a weight is encoded
    where it lives (a layer built on the GPU is encoded there, then its bytes go to the host region)."""

    name = "nf4"
    block = 64
    # blocks decoded per step by the torch decode: bounds the temporaries (on a GPU it runs only
    # without bitsandbytes and Triton; an 8B layer: 13 steps, ~50 MiB temporaries)
    chunk_blocks = {"cpu": 1 << 14, "cuda": 1 << 18}

    def __init__(self):
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._kernel = None  # bitsandbytes' dequantize_4bit, once prepared for a CUDA device

    def applies(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() == 2 and t.numel() > 0 and t.numel() % self.block == 0

    def nbytes(self, shape) -> int:
        n = shape[0] * shape[1]
        return align(n // 2) + (n // self.block) * 4

    def _parts(self, region: torch.Tensor, n: int):
        nb = n // self.block
        codes = typed(region, 0, n // 2, torch.uint8, (nb, self.block // 2))
        return codes, typed(region, align(n // 2), nb, torch.float32)

    def encode_into(self, t: torch.Tensor, region: torch.Tensor) -> None:
        """Encode `t` on its own device; the bytes land in `region` (the host pack, or any device)."""
        codes, absmax = self._parts(region, t.numel())
        w = t.detach().float().reshape(-1, self.block)
        scale = w.abs().amax(dim=1).clamp(min=1e-12)
        idx = torch.bucketize(w / scale[:, None], self.table("mids", w.device)).to(torch.uint8)
        codes.copy_((idx[:, 0::2] << 4) | idx[:, 1::2])
        absmax.copy_(scale)

    def decode_into(self, region: torch.Tensor, out: torch.Tensor, fused: bool | None = None) -> None:
        """`region` into `out` (same device). On CUDA: bitsandbytes' kernel when installed, else the
        fused Triton kernel, else the torch decode. `fused`: True forces the Triton kernel (any
        device: the interpreter on a CPU), False the torch decode."""
        codes, absmax = self._parts(region, out.numel())
        if fused is None and out.is_cuda and self._kernel is not None:  # one bitsandbytes kernel
            self._kernel(codes, absmax=absmax, out=out, blocksize=self.block, quant_type="nf4")
            return
        levels = self.table("levels", out.device)
        if (kernels.wanted(out) if fused is None else fused) and kernels.nf4_into(codes, absmax, levels, out):
            return
        _check_unfused(fused, "nf4")
        pairs = self.table("pairs", out.device)
        flat = out.view(-1, self.block)
        step = self.chunk_blocks.get(out.device.type, self.chunk_blocks["cpu"])
        for a in range(0, codes.shape[0], step):
            b = a + step
            vals = pairs.index_select(0, codes[a:b].reshape(-1).int()).view(-1, self.block)
            torch.mul(vals, absmax[a:b, None], out=flat[a:b])

    def prepare(self, device: torch.device) -> None:
        """Make the decode tables on `device` once, outside the copy path; on CUDA, take bitsandbytes'
        nf4 kernel when it is installed (else the fused kernel, or the torch decode, runs there)."""
        for name in ("levels", "pairs"):
            self.table(name, torch.device(device))
        if torch.device(device).type == "cuda":
            self._kernel = _bnb_dequantize_4bit()

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """"levels" (16), "mids" (the 15 boundaries between them) or "pairs" (256 x 2: the levels of each
        byte's high and low nibble), fp32 on `device`, made there on first use."""
        key = (name, torch.device(device))
        if key not in self._tables:
            self._tables[key] = _nf4_table(name, key[1])
        return self._tables[key]


def _nf4_table(name: str, device: torch.device) -> torch.Tensor:
    levels = nf4_codebook(device)
    if name == "mids":
        return (levels[1:] + levels[:-1]) / 2
    if name == "pairs":
        codes = torch.arange(256, device=device)
        return torch.stack([levels[codes >> 4], levels[codes & 15]], dim=1)
    return levels


def _check_unfused(fused: bool | None, name: str) -> None:
    """`fused=True` asked for the Triton kernel and it did not run: say why instead of decoding otherwise."""
    if fused:
        raise RuntimeError(f"the fused {name} decode did not run: {kernels.unavailable_reason()}")


def _bnb_dequantize_4bit():
    try:
        from bitsandbytes.functional import dequantize_4bit
    except Exception:  # noqa: BLE001 — not installed, or no CUDA build: the torch decode runs
        return None
    return dequantize_4bit


class GGUFRaw:
    """One GGUF tensor type kept as in the file: its bytes are packed as they are (`layout.Encoded`)
    and decoded into the slot, in fp32 and then cast to the slot's dtype, after each copy."""

    def __init__(self, kind: str):
        self.kind, self.name = kind, f"gguf:{kind}"

    def nbytes(self, shape) -> int:
        return gguf_blocks.nbytes(self.kind, torch.Size(shape).numel())

    def prepare(self, device: torch.device) -> None:
        gguf_blocks.prepare(device)

    def decode_into(self, region: torch.Tensor, out: torch.Tensor, fused: bool | None = None) -> None:
        gguf_blocks.decode_into(region, self.kind, out, fused)


CODECS = {"int8": Int8Rows, "nf4": NF4Blocks}


def make_codec(name: str | None):
    """None → no codec; "int8" / "nf4" → a codec instance."""
    return None if name is None else CODECS[name]()
