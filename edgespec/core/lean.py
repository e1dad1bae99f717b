"""A lean decoder forward for the drafter: the same math as transformers' Llama-family modules
(Llama, Mistral, Qwen2, Qwen3), written so it can be captured as a CUDA graph.

A small drafter's forward is all overhead: SmolLM2-135M's 30 layers cost 30-40 ms per forward on an
H200 whatever the token count (benchmarks/draft_gpu.md): ~40 small kernels per layer, each launched
through Python, plus transformers' per-call mask and cache machinery. The tree search runs one
forward per tree level, so that overhead is the drafter's speed. This forward issues the same math
straight from the model's own modules (bitsandbytes nf4/int8 layers work unchanged): a fused
RMSNorm per norm, rotary embedding from the model's rotary module once per forward (rope scaling
included), one SDPA call with the boolean tree mask and grouped KV heads. Over transformers' cache
(`cache.update`, which the rest of edgespec prunes) it only saves Python work (~1.2x per forward on
a CPU); over a StaticKV (edgespec/core/static_kv.py, the default on a GPU) its fixed shapes and
addresses let each forward replay as one CUDA graph.

Only the drafter uses it (edgespec/core/draft_runner.py builds it once); the target keeps transformers' forward, whose
token-exactness the tests check against `generate`. The drafter only proposes tokens, so rounding
differences here could never change the output, only which tokens are proposed (in fp32 the
dynamic path is bit-identical to transformers' on the tested models). tests/test_lean.py.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from edgespec.core import attention
from edgespec.core.static_kv import StaticKV
from edgespec.base import reach

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}

ROPES = {"default", "linear", "llama3", "yarn"}  # frequencies fixed at load (no per-call branching)


def supports(model) -> bool:
    """A Llama-family decoder whose layers carry no hooks (streamed or dispatched models keep
    transformers' forward, which runs their hooks) and share one attention pattern: a sliding window
    on every layer (Mistral) comes in the mask `forward.hidden_states` hands over, but mixed
    full/sliding layers (Qwen2/3 with use_sliding_window) would need one mask per layer, so those
    keep transformers' forward."""
    cfg = model.config
    decoder = model.get_decoder()
    rope = getattr(getattr(decoder, "rotary_emb", None), "rope_type", None)
    hooked = any(reach.has_forward_hooks(layer)
                 for layer in decoder.layers)
    return (cfg.model_type in SUPPORTED and len(set(attention.layer_windows(cfg))) == 1
            and rope in ROPES and hasattr(F, "rms_norm") and not hooked)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    return F.rms_norm(x, module.weight.shape, module.weight.to(x.dtype), eps)


class LeanDecoder:
    def __init__(self, model, static: bool = False):
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.static = static

    def new_cache(self) -> StaticKV:
        attn = self.layers[0].self_attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        weight = self.decoder.embed_tokens.weight
        return StaticKV(len(self.layers), kv_heads, attn.head_dim, weight.dtype, weight.device)

    @torch.no_grad()
    def __call__(self, cache, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None):
        """Same contract as `forward.hidden_states`: last hidden states (q, H) of `tokens` appended to
        `cache`, `allowed` a (q, past + q) bool visibility matrix or None for causal attention."""
        q = tokens.numel()
        past = cache.get_seq_length()
        if allowed is None:
            allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past)
        if isinstance(cache, StaticKV):
            return cache.run(self.static_forward, tokens, positions, allowed)
        dev = self.decoder.embed_tokens.weight.device
        inputs = {"tokens": tokens.to(dev), "positions": positions.to(dev), "mask": allowed.to(dev)}
        return self._layers(inputs, lambda i, k, v: cache.update(k, v, i))[0]

    def static_forward(self, cache: StaticKV, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The padded forward over preallocated buffers (capturable: fixed shapes and addresses)."""
        slots = inputs["slots"]

        def store(i, k, v):
            cache.keys[i].index_copy_(2, slots, k)
            cache.values[i].index_copy_(2, slots, v)
            return cache.keys[i], cache.values[i]

        return self._layers(inputs, store)[0]

    def _layers(self, inputs: dict[str, torch.Tensor], store) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed_tokens(inputs["tokens"][None])
        cos, sin = dec.rotary_emb(x, inputs["positions"][None])
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        mask = inputs["mask"][None, None]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.self_attn, _norm(layer.input_layernorm, x), cos, sin, mask,
                                    lambda k, v, i=i: store(i, k, v))
            x = x + layer.mlp(_norm(layer.post_attention_layernorm, x))
        return _norm(dec.norm, x)

    @staticmethod
    def _attention(attn, x, cos, sin, mask, store):
        shape = (1, x.shape[1], -1, attn.head_dim)
        qs, ks = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before rotary
            qs, ks = _norm(attn.q_norm, qs), _norm(attn.k_norm, ks)
        qs, ks = _rotate(qs.transpose(1, 2), cos, sin), _rotate(ks.transpose(1, 2), cos, sin)
        keys, values = store(ks, attn.v_proj(x).view(shape).transpose(1, 2))
        out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=keys.shape[1] != qs.shape[1])
        return attn.o_proj(out.transpose(1, 2).reshape(1, x.shape[1], -1))
