"""Loading: a model spec to models placed on the device or streamed, in one direction.

`resolve` (hub id, folder, GGUF, embedded default → local files) → `tensors` (safetensors shards or the
GGUF itself, decoded or raw) → `skeleton` (the model without its decoder layers) → `convert` (a GGUF's
de-quantized copy) / `bnb_copy` (a drafter's saved bitsandbytes copy) → `models` (whole loads) →
`loader` (the pair: placement through offload, the self-drafter). The self-drafter's low-bit layer copies
are `lowbit`, the model made of them `self_drafter`, and the pair's memory plan `memory_plan`.

May import: the base, offload and the core (for the pair checks); never the scheduler, the engine or the
front ends (tests/test_imports.py).
"""
