"""The engine: generations over a target/drafter pair, one step at a time.

`engine` (Engine: wires the pieces once), `run` (a generation: stopping, text, stats), `step` (one step:
plan → draft → verify → commit → observe), `conversation` (the committed ids, both caches and the
drafted subtree, committed together), `overlap` (drafting during the pass), `backoff` (the out-of-memory
retry), `prompts` (prompts to ids, the benchmark prompts).

May import: the base, offload, the core, the scheduler and (in `Engine.from_pretrained` only) loading;
never the front ends (tests/test_imports.py).
"""
from edgespec.engine.engine import Engine, Generation

__all__ = ["Engine", "Generation"]
