"""Page-locked host buffers of exactly the size asked for.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every
block up to a power of two (a 634 MB Llama-13B layer would pin 1 GiB). Instead, allocate ordinary
host memory and page-lock it in place with cudaHostRegister; unregister when the owner goes away.
If registering is not available, fall back to the caching allocator.
"""
from __future__ import annotations

import weakref

import torch

_PINNED: "weakref.WeakKeyDictionary[object, weakref.finalize]" = weakref.WeakKeyDictionary()  # owner → unregister



def host_buffer(nbytes: int, pin: bool, owner) -> torch.Tensor:
    """A uint8 host tensor of `nbytes`; page-locked if `pin` for as long as `owner` lives
    (or until `unpin(owner)`)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buf
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
        if int(err) != 0:
            getattr(cudart, "cudaGetLastError", lambda: None)()  # do not leave the error pending
            raise RuntimeError(f"cudaHostRegister failed with error {int(err)}")
    except Exception:  # no binding, or registering refused: the rounding allocator still pins
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    _PINNED[owner] = weakref.finalize(owner, _unregister, buf.data_ptr())
    return buf


def unpin(owner) -> None:
    """Unregister `owner`'s buffer now (before it is freed)."""
    fin = _PINNED.pop(owner, None)
    if fin is not None:
        fin()


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:
        pass
