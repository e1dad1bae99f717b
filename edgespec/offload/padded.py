"""A real model at the cost of a big one: zero-pad a small Llama into a larger Llama shape.

Benchmarks on a GPU need a target whose streaming and compute cost is realistic (an 8B or 13B
layer stack) *and* whose predictions are real (acceptance is only meaningful between a real
target and its drafter). `pad_to_shape(small, "llama-8b")` gives both: a LlamaForCausalLM with the
big shape's hidden size, heads, head size, MLP width and layer count, which computes exactly the
small model's function (up to rounding in the chosen dtype). Every streamed layer has the big
shape's bytes and matmul sizes; the padding is zeros.

How the function is kept:
- hidden, MLP and head dims: the small weights sit in the leading rows/columns, the rest is zero, so
  padded hidden dims stay exactly zero through the residual stream (SiLU(0) * 0 = 0 in the MLP);
- RMSNorm averages over the big hidden size: eps and the norm weights are rescaled by the ratio of
  hidden sizes, which gives the same normalised values;
- attention: each small query head takes a slot in a big KV group holding a copy of its small KV
  head (grouped or per-head, whichever the big shape allows); unused heads have zero output
  projections; queries are scaled by sqrt(big head dim / small head dim) for the softmax scale;
- rotary: small dims [0, d/2) and [d/2, d) go to big dims [0, d/2) and [D/2, D/2 + d/2), and the big
  rope theta is theta ** (D / d), so each pair rotates at the small model's frequency;
- extra layers are all zero (they add nothing to the residual); vocabulary and tied head are kept.

`pad_to_shape` builds the whole padded model on the host. For a target that streams (a 70B shape is
140 GB in bf16), `padded_skeleton` builds everything but the decoder layers, and `PaddedLayers` is the
layer source `offload_layers` fills them from, one at a time, each straight into the streamer.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from edgespec.base.errors import UnsupportedModelError
from edgespec.offload.shapes import SHAPES
from edgespec.base import reach


def pad_to_shape(small: LlamaForCausalLM, shape: str | dict, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """A LlamaForCausalLM of `shape` (a name in shapes.SHAPES, or a dict of the same config fields)
    on the host, computing `small`'s function (the whole padded model at once: see `PaddedLayers`
    for one layer at a time)."""
    big = padded_skeleton(small, shape, dtype)
    source = PaddedLayers(small, big.config)
    for i, layer in enumerate(big.model.layers):
        source.fill(i, layer, streamed=False)
    return big


def padded_skeleton(small: LlamaForCausalLM, shape: str | dict, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """The padded model with everything outside its decoder layers filled on the host (embeddings,
    final norm, head, rotary tables) and its decoder layers on the meta device (no memory), for
    `PaddedLayers` to fill one at a time."""
    cfg = small.config
    _check_supported(small)
    big_cfg = padded_config(cfg, shape)
    n, dtype = big_cfg.num_hidden_layers, dtype or small.dtype
    per_layer = {k: getattr(big_cfg, k) for k in ("num_hidden_layers", "layer_types") if hasattr(big_cfg, k)}
    big_cfg.num_hidden_layers = 0  # the rest built by transformers, no layer (and none initialised)
    if "layer_types" in per_layer:
        big_cfg.layer_types = []
    with no_init_weights():
        big = reach.model_from_config(LlamaForCausalLM, big_cfg, dtype)
    for k, v in per_layer.items():
        setattr(big.config, k, v)
    with torch.device("meta"):
        big.model.layers.extend(LlamaDecoderLayer(big.config, i).to(dtype) for i in range(n))
    big.requires_grad_(False)  # inference only (a benchmark target)
    with torch.no_grad():
        for p in big.parameters():
            if not p.is_meta:
                p.zero_()
        big.model.embed_tokens.weight[:, : cfg.hidden_size] = small.model.embed_tokens.weight
        _copy_norm(small.model.norm, big.model.norm, cfg, big_cfg)
        if not big_cfg.tie_word_embeddings:
            big.lm_head.weight[:, : cfg.hidden_size] = small.lm_head.weight
    if big_cfg.tie_word_embeddings:
        big.tie_weights()
    big.generation_config = small.generation_config
    big.config.name_or_path = f"{cfg.name_or_path or type(small).__name__}@{_shape_name(shape)}"
    return big.eval()


class PaddedLayers:
    """A layer source for `offload_layers(padded_skeleton(...), source=PaddedLayers(small, config, device))`:
    padded layer i is built on `device` just before it is placed (resident: it stays there; streamed:
    packed into the streamer's host buffer, then released), so the padded model never exists whole,
    and on a CPU host memory holds one padded layer at a time. Layers past the small model's are zeros."""

    encodes = False

    def __init__(self, small: LlamaForCausalLM, big_cfg, device: str | torch.device = "cpu"):
        self.small, self.big_cfg, self.device = small, big_cfg, torch.device(device)
        self.heads = head_slots(small.config, big_cfg)

    @torch.no_grad()
    def fill(self, i: int, layer: nn.Module, streamed: bool) -> dict:
        layer.to_empty(device=self.device)
        for p in layer.parameters():
            p.zero_()
        if i < len(self.small.model.layers):
            src = self.small.model.layers[i]
            if src.self_attn.q_proj.weight.device != self.device:  # a GPU: build there (a copy of the small layer)
                src = copy.deepcopy(src).to(self.device)
            _copy_layer(src, layer, self.small.config, self.big_cfg, self.heads)
        return {}


def padded_config(cfg, shape: str | dict) -> LlamaConfig:
    if isinstance(shape, str) and shape not in SHAPES:
        raise UnsupportedModelError(f"Unknown shape {shape!r}: choose one of {', '.join(SHAPES)}.")
    big = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    small_hd = _head_dim(cfg)
    big_hd = big["hidden_size"] // big["num_attention_heads"]
    theta = _rope_theta(cfg)
    fields = dict(big, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
                  max_position_embeddings=cfg.max_position_embeddings, head_dim=big_hd,
                  rms_norm_eps=cfg.rms_norm_eps * cfg.hidden_size / big["hidden_size"],
                  rope_parameters={"rope_type": "default", "rope_theta": theta ** (big_hd / small_hd)},
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    for name, small_v in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size),
                          ("num_hidden_layers", cfg.num_hidden_layers), ("head_dim", small_hd)):
        if fields[name] < small_v:
            raise UnsupportedModelError(f"Cannot pad into shape {_shape_name(shape)!r}: its {name} "
                                        f"({fields[name]}) is smaller than the model's ({small_v}). "
                                        "Pick a larger shape.")
    out = LlamaConfig(**fields)
    reach.set_attn_implementation(out, reach.attn_implementation(cfg, "sdpa"))
    return out


def head_slots(cfg, big_cfg) -> list[tuple[int, int]]:
    """For each small query head: (big query head, big KV group); a big group copies one small KV head."""
    small_q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    big_q_per_kv = big_cfg.num_attention_heads // big_cfg.num_key_value_heads
    owner: dict[int, int] = {}  # big group -> small kv head
    used: dict[int, int] = {}  # big group -> query slots taken
    slots = []
    for h in range(cfg.num_attention_heads):
        kv = h // small_q_per_kv
        group = next((g for g, o in owner.items() if o == kv and used[g] < big_q_per_kv), None)
        if group is None:
            group = len(owner)
            if group >= big_cfg.num_key_value_heads:
                raise UnsupportedModelError(
                    f"Cannot map {cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads into "
                    f"{big_cfg.num_attention_heads} / {big_cfg.num_key_value_heads}: pick another shape.")
            owner[group], used[group] = kv, 0
        slots.append((group * big_q_per_kv + used[group], group))
        used[group] += 1
    return slots


def head_halves(small_hd: int, big_hd: int) -> list[tuple[slice, slice]]:
    """(small head dims, big head dims) of the two rotary halves: small [0, d/2) -> big [0, d/2),
    small [d/2, d) -> big [D/2, D/2 + d/2)."""
    half = small_hd // 2
    return [(slice(0, half), slice(0, half)), (slice(half, small_hd), slice(big_hd // 2, big_hd // 2 + half))]


def _copy_layer(src, dst, cfg, big_cfg, heads) -> None:
    h = cfg.hidden_size
    shd, bhd = _head_dim(cfg), big_cfg.head_dim
    q_scale = math.sqrt(bhd / shd)
    sa, da = src.self_attn, dst.self_attn
    dtype = da.q_proj.weight.dtype
    q, k, v = (_by_head(w.weight.float(), shd) for w in (sa.q_proj, sa.k_proj, sa.v_proj))
    bq, bk, bv = (_by_head(w.weight, bhd) for w in (da.q_proj, da.k_proj, da.v_proj))
    o = sa.o_proj.weight.view(h, -1, shd).to(dtype)
    bo = da.o_proj.weight.view(da.o_proj.weight.shape[0], -1, bhd)
    small_q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    for head, (big_head, group) in enumerate(heads):
        kv = head // small_q_per_kv
        for s, b in head_halves(shd, bhd):  # plain slices: copies, not index_put (a CPU builds 30x faster)
            bq[big_head, b, :h] = (q[head, s] * q_scale).to(dtype)
            bo[:h, big_head, b] = o[:, head, s]
            bk[group, b, :h] = k[kv, s].to(dtype)
            bv[group, b, :h] = v[kv, s].to(dtype)
    inter = cfg.intermediate_size
    dst.mlp.gate_proj.weight[:inter, :h] = src.mlp.gate_proj.weight
    dst.mlp.up_proj.weight[:inter, :h] = src.mlp.up_proj.weight
    dst.mlp.down_proj.weight[:h, :inter] = src.mlp.down_proj.weight
    _copy_norm(src.input_layernorm, dst.input_layernorm, cfg, big_cfg)
    _copy_norm(src.post_attention_layernorm, dst.post_attention_layernorm, cfg, big_cfg)


def _by_head(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(heads * head_dim, hidden) projection viewed as (heads, head_dim, hidden)."""
    return weight.view(-1, head_dim, weight.shape[-1])


def _copy_norm(src, dst, cfg, big_cfg) -> None:
    dst.weight[: cfg.hidden_size] = src.weight * math.sqrt(cfg.hidden_size / big_cfg.hidden_size)


def _check_supported(model) -> None:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    problems = []
    if not isinstance(model, LlamaForCausalLM):
        problems.append(f"architecture {type(model).__name__} (only LlamaForCausalLM)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("biases")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope type {rope.get('rope_type')!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.hidden_act!r}")
    if problems:
        raise UnsupportedModelError("Cannot pad this model into a bigger shape: " + ", ".join(problems)
                                    + " not supported. Use a Llama-architecture model (e.g. the embedded default).")


def _shape_name(shape: str | dict) -> str:
    return shape if isinstance(shape, str) else "custom"


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
