"""The drafter's KV cache as preallocated buffers, so its forwards can be replayed from CUDA graphs.

A drafter forward issues ~1,000 small kernels; on a GPU their launches, not the math, are its cost
(30-40 ms for SmolLM2-135M, benchmarks/draft_gpu.md). A CUDA graph replays them in one launch, but
only over fixed shapes and addresses. So: keys and values live in fixed (1, kv_heads, capacity,
head_dim) buffers, a forward of q tokens is padded to a bucket of b >= q tokens (b a power of two),
writes its entries at slots [length, length + b) and attends over the whole buffer through a
(b, capacity) boolean mask in which slots past the live ones are never visible. Each bucket is
captured once per cache, on its first use (`StaticKV.run`), and replayed from then on.

Pruning after a step (`keep`, `crop`) moves entries inside the same buffers and changes `length`,
so captured graphs stay valid; only growing the capacity reallocates and drops them.

On a CPU (no graphs) the same buffers and padded forward run eagerly: that is how the tests check
this path. The first replay of every captured bucket is compared against the eager run that warmed
it up; a mismatch or a capture error turns graphs off for the cache (with a warning), never the
output wrong.
"""
from __future__ import annotations

import warnings

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # token counts replayed from graphs; longer feeds run eagerly
GROW = 1024  # capacity granularity (slots)


class GraphFallbackWarning(UserWarning):
    """CUDA graphs were turned off for a drafter cache; its forwards run eagerly (slower, same result)."""


def bucket_for(q: int) -> int | None:
    return next((b for b in BUCKETS if b >= q), None)


class StaticKV:
    """The drafter's KV cache as preallocated buffers (the `kv.KVCache` protocol)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 2 * GROW, graphs: bool | None = None):
        self.shape = (1, kv_heads, 0, head_dim)
        self.dtype, self.device, self.n_layers = dtype, torch.device(device), layers
        self.length = 0
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.lazy = True  # capture a bucket on its first use (until `capture` is called)
        self._graphs: dict[int, _Captured] = {}
        self._pool = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(capacity)

    # ---- the interface the rest of edgespec uses on a cache -----------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only the entries at `positions` (ascending), moved to the front in that order."""
        idx = positions.to(self.device)
        m = idx.numel()
        for buf in self.keys + self.values:
            buf[:, :, :m] = buf.index_select(2, idx)
        self.length = m

    def layer_lengths(self) -> list[int]:
        return [self.length] * self.n_layers

    def crop_to(self, length: int) -> None:
        self.length = min(self.length, max(length, 0))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    # ---- forwards ------------------------------------------------------------------------------
    def capture(self, forward) -> None:
        """Capture every bucket now (at start-up or before a step, with nothing else running on the
        device) instead of on first use, which may fall while the target streams its layers in
        another thread. From then on this cache captures only here: after a growth drops its graphs,
        forwards run eagerly until the next call."""
        self.lazy = False
        if not self.use_graphs or all(b in self._graphs for b in BUCKETS):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # pruning may still run on the drafting stream
        start = self.length
        self._reserve(start + BUCKETS[-1])  # growing later would drop the graphs captured here
        for b in BUCKETS:
            if self.use_graphs and b not in self._graphs:
                allowed = torch.ones(b, start + b, dtype=torch.bool).tril(start)
                self.run(forward, torch.zeros(b, dtype=torch.long), torch.arange(start, start + b), allowed,
                         capture=True)
                self.crop_to(start)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # dummy entries written before any stream reuses the slots

    def run(self, forward, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
            capture: bool | None = None) -> torch.Tensor:
        """Append `tokens` (q,) at `positions` with visibility `allowed` (q, length + q) through
        `forward(cache, inputs) -> hidden (b, H)`; returns the q real rows' hidden states. A bucket
        not captured yet is captured after this forward if `capture` (default: `self.lazy`)."""
        q = tokens.numel()
        b = bucket_for(q) or q
        self._reserve(self.length + b)
        inputs = self._inputs(tokens, positions, allowed, b)
        graphed = self.use_graphs and b in BUCKETS
        if graphed and b in self._graphs:
            hidden = self._graphs[b].replay(inputs)
        else:
            hidden = forward(self, inputs)
            if graphed and (self.lazy if capture is None else capture):
                self._capture(forward, inputs, hidden, b)
        self.length += q
        return hidden[:q]

    def _inputs(self, tokens, positions, allowed, b: int) -> dict[str, torch.Tensor]:
        q, n, cap = tokens.numel(), self.length, self.capacity
        mask = torch.zeros(b, cap, dtype=torch.bool)
        mask[:q, : n + q] = allowed
        pad = torch.arange(q, b)
        mask[pad, n + pad] = True  # padding rows see only themselves (their outputs are dropped)
        ids = torch.zeros(b, dtype=torch.long)
        ids[:q] = tokens
        pos = torch.full((b,), int(positions[-1]), dtype=torch.long)
        pos[:q] = positions
        host = {"tokens": ids, "positions": pos, "slots": torch.arange(n, n + b), "mask": mask}
        return {k: v.to(self.device, non_blocking=True) for k, v in host.items()}

    def _capture(self, forward, inputs, eager_hidden, b: int) -> None:
        try:
            captured = _Captured(forward, self, inputs, self._pool)
            self._pool = captured.pool
            replayed = captured.replay(inputs)  # rewrites the same cache entries with the same values
            want = eager_hidden.float()
            err = float((replayed.float() - want).norm() / want.norm().clamp(min=1e-6))
            if not err <= 0.02:  # a broken capture (stale inputs, wrong buffers) is off by O(1), or NaN
                raise RuntimeError(f"replayed bucket {b} differs from the eager forward (relative error {err:.3g})")
            self._graphs[b] = captured
        except Exception as exc:  # noqa: BLE001 — any capture failure: run eagerly from now on
            self.use_graphs, self._graphs, self._pool = False, {}, None
            warnings.warn(f"edgespec: CUDA graphs turned off for the drafter ({exc}); drafting runs eagerly, "
                          "slower but with the same output. Set EDGESPEC_LEAN=dynamic to skip this path.",
                          GraphFallbackWarning, stacklevel=3)

    # ---- buffers -------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        shape = (*self.shape[:2], capacity, self.shape[3])
        old_k, old_v, n = self.keys, self.values, self.length
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        for new, old in zip(self.keys + self.values, old_k + old_v):
            new[:, :, :n] = old[:, :, :n]
        self._graphs, self._pool = {}, None  # captured against the old buffers

    def _reserve(self, slots: int) -> None:
        if slots > self.capacity:
            self._allocate(max(2 * self.capacity, (slots + GROW - 1) // GROW * GROW))


class _Captured:
    """One bucket's forward captured as a CUDA graph, with the static input buffers it reads."""

    def __init__(self, forward, cache: StaticKV, inputs: dict[str, torch.Tensor], pool):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            forward(cache, self.inputs)  # warm-up on the capture stream (rewrites the same entries)
            with torch.cuda.graph(self.graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                self.output = forward(cache, self.inputs)
        torch.cuda.current_stream(cache.device).wait_stream(side)

    def replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for k, v in inputs.items():
            self.inputs[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.output.clone()
