"""Beyond one machine: the target split across processes (machines) by contiguous layer ranges, on
torch.distributed (gloo; tensors only on the wire, never pickle).

Stage 0 holds the embeddings (and its own layers), the drafter, the scheduler and the conversation; each
other stage holds a layer range with its own KV cache, resident or streamed from its own RAM by the
offload wing's streamer; the last stage holds the final norm and head and walks the tree with stage 0's
sampler, sending back only the verdict. `layers` (a layer range read from a stage's own model file),
`wire` (the fixed-layout messages and the timed waits), `group` (rendezvous, identities, heartbeats,
generations), `placement` (--stages / TOML / split by free memory), `target` (stage 0: PipelineTarget,
StagedCache), `stage` (the other stages' process), `hops` (what a pass costs across stages).

May import: the base, offload, the core, the scheduler and loading; the engine and the front ends may
import it (tests/test_imports.py).
"""
