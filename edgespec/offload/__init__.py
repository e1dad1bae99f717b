"""Run a model larger than the device: stream its decoder layers from host memory each forward pass.

    handle = offload_layers(model, device="cuda")   # or "cpu": same code path, a copy thread
    find_handle(model)                               # the same handle, found from the model's hooks
    model(...)                                       # plain HF forward / generate, KV caches, 4-D masks
    handle.last_pass                                 # bytes, transfer / compute / wait / wall, overlap
    handle.remove()                                  # back to a normal (host) model

Modules: `api` (offload_layers), `streamer` (the ring and hooks), `layout` (packed layers and slots),
`transport` (CUDA copy and decode streams / CPU thread copies), `codecs` (int8 / nf4 codecs, and GGUF
blocks kept as in the file), `gguf_blocks` (GGUF blocks de-quantized in torch: the CPU path),
`kernels` (the fused Triton decodes CUDA runs, bit for bit the torch ones), `trace`, `placement`,
`bandwidth` (link measurement) and `shapes` (random-weight models of a named shape, for profiling),
`pinned` (exact-size page-locked host buffers), `padded` (a small model at a big one's cost). Nothing
here resolves or reads models: edgespec/loading/loader.py hands `offload_layers` a layer source that fills
each layer (or gives its tensors already encoded) just before it is placed.

Limits: inference only (streamed weights are bound without autograd); one forward at a time per
model (no concurrent forwards from several threads); do not `model.to(...)` or deepcopy an offloaded
model (call `handle.remove()` first); layers must not share weights with each other or with the rest
of the model; `ring` is clamped to the number of streamed layers and every pass re-streams every
streamed layer, even when the ring could hold them all.
"""
from edgespec.offload.api import offload_layers
from edgespec.offload.trace import OffloadStats, PassStats
from edgespec.offload.streamer import OffloadHandle, find_handle

__all__ = ["offload_layers", "find_handle", "OffloadHandle", "OffloadStats", "PassStats"]
