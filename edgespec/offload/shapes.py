"""Random-weight Llama models of a named shape, for profiling streaming without downloading weights.

Weights are random but cheap to make (see `fill_random`); timing does not depend on the values.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from edgespec.base import reach

SHAPES = {
    # small enough for CI on a laptop CPU
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # Llama 3.2 1B
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # Llama 3.1 8B
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # Llama 2 13B
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    # Llama 3.1 70B (a padded target's layers: 1.71 GB each in bf16, 0.48 GB nf4-encoded)
    "llama-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    # the smallest shapes the embedded SmolLM2-135M (576 hidden, 1536 MLP, 30 layers, 9 / 3 heads of 64)
    # pads into, standing in for llama-8b / llama-70b when scripts/gpu_figures.sh runs on a CPU
    "llama-8b-tiny": dict(vocab_size=49152, hidden_size=768, intermediate_size=1792, num_hidden_layers=32,
                          num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-70b-tiny": dict(vocab_size=49152, hidden_size=576, intermediate_size=1664, num_hidden_layers=34,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shape_config(shape: str, attn: str = "sdpa") -> LlamaConfig:
    if shape not in SHAPES:
        from edgespec.base.errors import InvalidArgumentError

        raise InvalidArgumentError(f"Unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}.")
    cfg = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    reach.set_attn_implementation(cfg, attn)
    return cfg


def build_random_model(shape: str, dtype: torch.dtype | str = torch.bfloat16, seed: int = 0, std: float = 0.02,
                       attn: str = "sdpa") -> LlamaForCausalLM:
    """A LlamaForCausalLM of `shape` on the host in `dtype`, random weights, in eval mode."""
    dtype = DTYPES.get(dtype, dtype)
    cfg = shape_config(shape, attn)
    with no_init_weights():
        model = reach.model_from_config(LlamaForCausalLM, cfg, dtype)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    fill_random(model, seed, std)
    return model.eval()


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill parameters: 1-D ones (norms), others tiled from one seeded normal(0, std) pool.

    The pool length is odd so matrix rows do not repeat with a short period; filling costs one
    memcpy of the model, not a random-number draw per weight (a 8B model fills in seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    pool32 = torch.randn((1 << 22) + 17, generator=gen) * std
    pools: dict[torch.dtype, torch.Tensor] = {}
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        pool = pools.setdefault(p.dtype, pool32.to(p.dtype))
        flat = p.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            chunk = flat[start : start + pool.numel()]
            chunk.copy_(pool[: chunk.numel()])

