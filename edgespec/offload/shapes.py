"""Random-weight Llama models of a named shape, for profiling streaming without downloading weights.

Weights are random but cheap to make (see `fill_random`); timing does not depend on the values.
`build_random_model` makes the whole model on the host; `random_skeleton` + `RandomLayers` make its
decoder layers one at a time as `offload_layers` places them, on a device of choice (a GPU builds and
encodes an 8B layer in milliseconds), optionally with every streamed 2-D weight given as random valid
GGUF blocks of one type (what a GGUF target's streamed layers are).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

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
    pool32 = _pool(seed, std)
    pools: dict[tuple, torch.Tensor] = {}
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        pool = pools.setdefault((p.dtype, p.device), pool32.to(p.device, p.dtype))
        flat = p.view(-1)
        for start in range(0, flat.numel(), pool.numel()):
            chunk = flat[start : start + pool.numel()]
            chunk.copy_(pool[: chunk.numel()])



@functools.lru_cache(maxsize=2)
def _pool(seed: int, std: float) -> torch.Tensor:
    """The seeded normal(0, std) pool weights are tiled from (made once per seed: 16 MB)."""
    return torch.randn((1 << 22) + 17, generator=torch.Generator().manual_seed(seed)) * std


def random_skeleton(shape: str, dtype: torch.dtype | str = torch.bfloat16, seed: int = 0,
                    attn: str = "sdpa") -> LlamaForCausalLM:
    """The model of `shape` with everything outside its decoder layers random on the host and its
    decoder layers on the meta device, for `RandomLayers` to fill as they are placed."""
    dtype = DTYPES.get(dtype, dtype)
    cfg = shape_config(shape, attn)
    n, cfg.num_hidden_layers = cfg.num_hidden_layers, 0
    with no_init_weights():
        model = reach.model_from_config(LlamaForCausalLM, cfg, dtype)
    model.config.num_hidden_layers = n
    with torch.device("meta"):
        model.model.layers.extend(LlamaDecoderLayer(model.config, i).to(dtype) for i in range(n))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    fill_random(model, seed)
    return model.eval()


class RandomLayers:
    """A layer source for `offload_layers(random_skeleton(...), source=RandomLayers(...))`: layer i is
    made on `device` with random weights just before it is placed (a codec then encodes it there);
    with `gguf` (a type name), a streamed layer's 2-D weights whose rows are whole blocks are given as
    random valid blocks of that type (random codes, finite fp16 scales of a trained model's size),
    made on `device`, packed as they are and decoded on the device after each copy."""

    def __init__(self, device: torch.device | str = "cpu", gguf: str | None = None, seed: int = 0):
        from edgespec.offload.codecs import GGUFRaw

        self.device, self.kind, self.seed = torch.device(device), gguf, seed
        self.codec = GGUFRaw(gguf) if gguf else None
        self.encodes = gguf is not None

    @torch.no_grad()
    def fill(self, i: int, layer: nn.Module, streamed: bool) -> dict:
        from edgespec.offload import gguf_blocks
        from edgespec.offload.layout import Encoded

        layer.to_empty(device=self.device)
        fill_random(layer, self.seed)
        if not (streamed and self.kind):
            return {}
        block = gguf_blocks.TYPES[self.kind].block
        return {name: Encoded(self.codec, self.codec.nbytes(t.shape), self._writer(i, name))
                for name, t in layer.state_dict().items() if t.dim() == 2 and t.shape[1] % block == 0}

    def _writer(self, i: int, name: str):
        from edgespec.offload import gguf_blocks

        def write(region: torch.Tensor) -> None:
            t = gguf_blocks.TYPES[self.kind]
            gen = torch.Generator(self.device).manual_seed(self.seed + 7919 * i + len(name))
            blocks = torch.randint(0, 256, (region.numel() // t.size, t.size), dtype=torch.uint8,
                                   device=self.device, generator=gen)
            for at in gguf_blocks.FP16_FIELDS[self.kind]:
                d = (torch.rand(blocks.shape[0], device=self.device, generator=gen) * 2e-3).half()
                blocks[:, at : at + 2] = d.view(torch.uint8).view(-1, 2)
            region.copy_(blocks.view(-1))
        return write
