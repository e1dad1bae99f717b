"""Where a model runs and what it costs there: its device and dtype, streams, synchronisation, bytes."""
from __future__ import annotations

import contextlib

import torch


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where its forwards start)."""
    return model.get_input_embeddings().weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its first floating-point parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def run_dtype(device: torch.device) -> torch.dtype:
    """The dtype models run in on `device`: bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def hold_beyond(device: torch.device, gib: float | None):
    """On CUDA, take every free byte beyond `gib` GiB of card in one dummy tensor (returned: keep it
    alive), so what runs next sees a card of that size; None on a CPU, or when nothing is to take."""
    device = torch.device(device)
    if gib is None or device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    take = free - max(0, int(gib * 2**30) - (total - free))
    return torch.empty(take, dtype=torch.uint8, device=device) if take > 0 else None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache() -> None:
    """Hand the CUDA allocator's cached blocks back (after an out-of-memory)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def side_stream(device: torch.device):
    """A second CUDA stream on `device` (None on a CPU), for drafting while the target pass runs."""
    return torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None


def on_stream(stream):
    """Work issued inside runs on `stream` (None: the current one)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def wait_stream(stream) -> None:
    """The current stream waits for the work issued on `stream`."""
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
