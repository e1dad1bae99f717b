"""Fused decode kernels (Triton): every GGUF block type edgespec decodes, int8 rows and nf4 blocks, one
launch per tensor that reads the packed bytes once and writes the slot once, with the values of the
torch decode (edgespec/offload/gguf_blocks.py, codecs.py) and of gguf-py's reference, bit for bit.

    from edgespec.offload import kernels
    kernels.gguf_into(data, "Q4_K", out, table)   # True: decoded; False: the caller runs the torch decode
    kernels.int8_into(q, scale, out)
    kernels.nf4_into(codes, absmax, levels, out)

The codecs call them for CUDA tensors, where Triton compiles them (torch's CUDA wheels ship Triton).
The value tables (IQ4, MXFP4, NF4) are the caller's, on the tensor's device. On a machine without CUDA
the same kernels run through Triton's interpreter (numpy, one program at a time): only the tests and
`scripts/gpu_check.sh --device cpu` do that; at run time the CPU decodes with the torch code. Without
Triton, or when a kernel fails to build here, a warning says so once and the torch decode runs.

Modules: `parts` (byte / fp16 reads, the store in the slot's dtype), `gguf` (the block types), `rows`
(int8 and nf4). Triton is imported on first use, never by `import edgespec`.
"""
from __future__ import annotations

import warnings

import torch

OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # parts.OUT_F32 / OUT_BF16 / OUT_F16
_STATE: dict = {"modules": None, "failed": None, "everywhere": False}


def wanted(out: torch.Tensor) -> bool:
    """Whether a decode into `out` takes the kernels by default: on CUDA; anywhere after `everywhere(True)`."""
    return out.is_cuda or _STATE["everywhere"]


def everywhere(on: bool = True) -> None:
    """Decode with the kernels on every device (a CPU: through the interpreter, slowly), so that
    `scripts/gpu_check.py --device cpu` runs the GPU's decode path through the streamer on a CPU."""
    _STATE["everywhere"] = on


def gguf_into(data: torch.Tensor, kind: str, out: torch.Tensor, table: torch.Tensor) -> bool:
    """Decode the uint8 `data` (whole blocks of GGUF type `kind`) into `out`; `table`: the type's 16
    values (fp32, `out`'s device) or any small tensor there for types without one."""
    mods = _modules()
    if mods is None or kind not in mods[0].LAYOUTS or not _fits(out, data):
        return False
    _, qk, size, _ = mods[0].LAYOUTS[kind]
    _same_size(f"{kind} blocks", data.numel() // size * qk, out, data.numel() % size == 0)
    return _launch(mods[0].launch, data, kind, _dst(out), table, OUT_KINDS[out.dtype])


def int8_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
    """int8 codes `q` (rows, cols) times their row's fp32 `scale` into `out`."""
    mods = _modules()
    if mods is None or not _fits(out, q, scale):
        return False
    _same_size("int8 codes", q.numel(), out, q.dim() == 2 and scale.numel() == q.shape[0])
    return _launch(mods[1].launch_int8, q, scale, _dst(out), OUT_KINDS[out.dtype])


def nf4_into(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, out: torch.Tensor) -> bool:
    """nf4 codes (uint8, two per byte, 64 weights per fp32 `absmax`) into `out`; `levels`: the 16 fp32 levels."""
    mods = _modules()
    if mods is None or not _fits(out, codes, absmax):
        return False
    _same_size("nf4 codes", codes.numel() * 2, out, codes.numel() == absmax.numel() * 32)
    return _launch(mods[1].launch_nf4, codes, absmax, levels, _dst(out), OUT_KINDS[out.dtype])


def available() -> bool:
    """Whether the kernels can run here (Triton imports, and no kernel has failed to build)."""
    return _modules() is not None


def disable(reason: str) -> None:
    """Leave every decode to the torch code from now on (e.g. to measure it against the kernels)."""
    _STATE["modules"], _STATE["failed"] = None, f"disabled ({reason})"


def unavailable_reason() -> str:
    """Why the kernels do not run here ("" when they do)."""
    return "" if available() else _STATE["failed"] or "Triton could not be loaded"


def interpreted() -> bool:
    """Whether the kernels run through Triton's interpreter (no CUDA here, or TRITON_INTERPRET=1)."""
    mods = _modules()
    return mods is not None and mods[2].interpreted()


def _fits(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    return out.dtype in OUT_KINDS and out.is_contiguous() and all(t.is_contiguous() for t in inputs)


def _same_size(what: str, weights: int, out: torch.Tensor, whole: bool) -> None:
    """The kernels write exactly what their input holds: a slot of another size is a caller's error."""
    if not whole or weights != out.numel():
        raise ValueError(f"{what} hold {weights} weights (whole: {whole}), the slot {out.numel()}")


def _dst(out: torch.Tensor) -> torch.Tensor:
    """bf16 slots are written as int16 bits (parts.bf16_bits rounds them)."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _launch(fn, *args) -> bool:
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 — a kernel that cannot build here: the torch decode runs
        _give_up(f"a decode kernel failed ({type(err).__name__}: {err})")
        return False
    return True


def _modules():
    """(gguf, rows, parts) kernel modules, imported once; None when Triton is missing or a kernel failed."""
    if _STATE["modules"] is None and _STATE["failed"] is None:
        try:
            import triton  # noqa: F401 — on CUDA, torch's wheels bring it
            from edgespec.offload.kernels import gguf, parts, rows
        except ImportError as err:
            _give_up(f"Triton is not installed ({err}); pip install triton (torch's CUDA wheels bring it)")
        else:
            _STATE["modules"] = (gguf, rows, parts)
    return _STATE["modules"]


def _give_up(why: str) -> None:
    """Warn once, then leave every decode to the torch code for the rest of the process."""
    _STATE["modules"], _STATE["failed"] = None, why
    warnings.warn(f"edgespec: {why}: streamed weights are decoded by the slower torch code instead",
                  RuntimeWarning, stacklevel=3)
