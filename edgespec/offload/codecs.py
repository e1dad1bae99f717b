"""Weight codecs for streamed layers: fewer bytes cross the host→device link, decoded on the device.

A codec turns one 2-D floating weight into a compact byte region (`encode_into`, once, on the host)
and writes it back at the weight's dtype into a slot view (`decode_into`, every pass, on the device).

- `Int8Rows`: per-output-row absmax int8, w ≈ q · scale[row], q ∈ [-127, 127], fp32 scales.
  ~1 byte per weight. Measured on random Llama-shaped layers: relative weight error ≈ 0.6 %
  (round-to-nearest on 255 levels); end-to-end logit error see tests/test_offload.py.
- `NF4Blocks`: 4-bit "normal float" codebook (16 quantiles of N(0, 1) scaled to [-1, 1]) with one
  fp32 absmax per block of 64 weights. ~0.56 bytes per weight, relative weight error ≈ 10 %. Its bytes
  are bitsandbytes' nf4 layout (`quantize_4bit(w, blocksize=64, quant_type="nf4",
  compress_statistics=False)`), so on CUDA bitsandbytes' own kernel decodes them into the slot in one
  launch; elsewhere the torch decode here gives the same values.
- `GGUFRaw`: a GGUF tensor as it is in the file (edgespec/offload/gguf_blocks.py decodes its blocks);
  not a `--stream-quant` choice: the loader hands such tensors over already encoded.
"""
from __future__ import annotations

import torch

from edgespec.offload import gguf_blocks

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

    def decode_into(self, region: torch.Tensor, out: torch.Tensor) -> None:
        q, s = self._parts(region, out.shape)
        torch.mul(q, s[:, None], out=out)


# The 16 NF4 levels (QLoRA: quantiles of N(0, 1), 7 negative, 0, 8 positive, scaled to [-1, 1]) as
# the float32 values bitsandbytes' kernels hold them (`bitsandbytes.functional.get_4bit_type("nf4")`;
# a test checks they are equal), so the torch decode and bitsandbytes' kernel give the same weights.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels, ascending, fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


class NF4Blocks:
    """4-bit normal-float codec: two codes per byte, one fp32 absmax per block of `block` weights."""

    name = "nf4"
    block = 64
    # blocks decoded per step: bounds the temporaries; on a GPU each step is 3 kernel launches on the
    # host's critical path, so steps are 16x bigger there (an 8B layer: 13 steps, ~50 MiB temporaries)
    chunk_blocks = {"cpu": 1 << 14, "cuda": 1 << 18}

    def __init__(self):
        self.levels = nf4_codebook()
        self.mids = (self.levels[1:] + self.levels[:-1]) / 2
        # pairs[b] = (level of high nibble, level of low nibble) for every byte value b
        codes = torch.arange(256)
        self.pairs = torch.stack([self.levels[codes >> 4], self.levels[codes & 15]], dim=1)
        self._device_pairs: dict[torch.device, torch.Tensor] = {}
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
        codes, absmax = self._parts(region, t.numel())
        w = t.detach().float().reshape(-1, self.block)
        scale = w.abs().amax(dim=1).clamp(min=1e-12)
        idx = torch.bucketize(w / scale[:, None], self.mids).to(torch.uint8)
        codes.copy_((idx[:, 0::2] << 4) | idx[:, 1::2])
        absmax.copy_(scale)

    def decode_into(self, region: torch.Tensor, out: torch.Tensor) -> None:
        codes, absmax = self._parts(region, out.numel())
        if out.is_cuda and self._kernel is not None:  # one bitsandbytes kernel, straight into the slot
            self._kernel(codes, absmax=absmax, out=out, blocksize=self.block, quant_type="nf4")
            return
        pairs = self._pairs_on(out.device)
        flat = out.view(-1, self.block)
        step = self.chunk_blocks.get(out.device.type, self.chunk_blocks["cpu"])
        for a in range(0, codes.shape[0], step):
            b = a + step
            vals = pairs.index_select(0, codes[a:b].reshape(-1).int()).view(-1, self.block)
            torch.mul(vals, absmax[a:b, None], out=flat[a:b])

    def prepare(self, device: torch.device) -> None:
        """Put the byte → level-pair table on `device` once, outside the copy path; on CUDA, take
        bitsandbytes' nf4 kernel when it is installed (else the torch decode runs there too)."""
        self._pairs_on(device)
        if torch.device(device).type == "cuda":
            self._kernel = _bnb_dequantize_4bit()

    def _pairs_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_pairs:
            self._device_pairs[device] = self.pairs.to(device)
        return self._device_pairs[device]


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

    def decode_into(self, region: torch.Tensor, out: torch.Tensor) -> None:
        gguf_blocks.decode_into(region, self.kind, out)


CODECS = {"int8": Int8Rows, "nf4": NF4Blocks}


def make_codec(name: str | None):
    """None → no codec; "int8" / "nf4" → a codec instance."""
    return None if name is None else CODECS[name]()
