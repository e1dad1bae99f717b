"""Memory arithmetic: how many bytes a target pass over a tree needs beyond the weights, how many are
free, and the largest tree that fits. Used by the step's memory cap, the loader and the pair's memory
plan; the timing measurements live in edgespec/scheduler/timing.py."""
from __future__ import annotations

import psutil
import torch


def free_memory(device: torch.device) -> int:
    """Bytes free for activations: device memory on CUDA, available host RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def pass_bytes(config, tokens: int, past: int, dtype_bytes: int = 2) -> int:
    """Peak bytes one forward over `tokens` tree tokens on a `past`-token cache needs beyond weights:
    KV entries for the new tokens, hidden/MLP activations of one layer, a materialised attention
    score matrix for one layer (custom tree masks defeat the flash kernels), and the mask itself."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    layers = config.num_hidden_layers
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype_bytes
    act = tokens * (4 * h + 3 * inter) * dtype_bytes
    scores = 2 * heads * tokens * (past + tokens) * 4
    return kv + act + scores + tokens * (past + tokens)


def max_tree_tokens(config, past: int, free: int, fraction: float = 0.5, ceiling: int = 4096) -> int:
    """The largest tree (tokens in one pass) whose activations fit in `fraction` of `free` bytes."""
    lo, hi = 0, ceiling
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pass_bytes(config, mid, past) <= free * fraction:
            lo = mid
        else:
            hi = mid - 1
    return lo
