"""Measure the link that streamed layers cross: pinned host→device on CUDA, host memcpy on CPU."""
from __future__ import annotations

import time

import torch


def measure_bandwidth(device: str | torch.device = "cuda", nbytes: int | None = None, repeats: int = 5) -> float:
    """Best of `repeats` copies of `nbytes` (default 256 MiB on CUDA, 64 MiB on CPU), in bytes/s."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_bandwidth(device, nbytes or 256 << 20, repeats)
    return _host_bandwidth(nbytes or 64 << 20, repeats)


def _cuda_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best


def _host_bandwidth(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
