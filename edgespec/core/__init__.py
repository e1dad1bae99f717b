"""The speculation core: the token tree, the best-first search that drafts it, the drafter's forwards,
the target's verification pass, the attention masks, the KV caches, sampling and tree scores.

`tree` (Tree, ancestor masks), `search` (TreeSearch: best-first drafting, re-rooting), `drafter` (a
drafting model and its forward: transformers', `lean`, or `lean` over `static_kv` with CUDA graphs),
`forward` (the target's forward over a tree), `verify` (the target's picks, the accepted path),
`attention` (tree masks, sliding windows, attention implementations), `kv` (the KV-cache protocol and
its adapters), `sampling` (SamplingConfig, Sampler), `scores` (calibrated tree scores), `pair` (what a
target/drafter pair must share: vocabulary, context window, end tokens), `grammar` (grammar constraints:
Grammar, Constraint, a GrammarState per tree node; llguidance), `logprobs` (the log-probabilities of the
picked tokens).

May import: the base only. It never imports loading, offload, the scheduler, the engine or the front
ends (tests/test_imports.py).
"""
