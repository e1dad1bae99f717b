"""One stage's part of the target, read from its own copy of the model file: a contiguous range of
decoder layers (resident or streamed by the offload wing's streamer, as a single-process target's
are), the embeddings on the first stage, the final norm and the head on the last.

The stage model is the family's own causal LM built with only `last - first` layers (numbered 0.. so
the stage's KV cache is an ordinary cache of that many layers); a layer's tensors are read under the
whole model's names (`model.layers.{first + i}.…`), nothing outside the range is read, and the pass is
the family's own decoder forward over hidden states (`inputs_embeds`), so each stage computes exactly
what those layers compute inside the whole model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgespec.base.device import compute_dtype, run_dtype
from edgespec.core.forward import hidden_states, logits_from_hidden
from edgespec.base.errors import UnsupportedModelError
from edgespec.loading.convert import gguf_index
from edgespec.loading.loader import LayerSource
from edgespec.loading.resolve import resolve
from edgespec.loading.skeleton import gguf_model, layer_groups, layer_prefix, meta_model
from edgespec.loading.tensors import SafetensorsTensors, Unsupported
from edgespec.offload import api

# Families whose decoder forward does nothing to `inputs_embeds` before the first layer (Gemma scales
# them, Granite multiplies them): a layer range of these computes what it computes in the whole model.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Range:
    """Layers [first, last) of a target with `total` layers; `resident` of them stay on the device."""

    first: int
    last: int
    total: int
    resident: int | None = None  # None: all of them

    @classmethod
    def of(cls, plan: dict, rank: int) -> "Range":
        """Stage `rank`'s range in a plan ({"total": n, "ranges": [[first, last, resident or None], ...]})."""
        first, last, resident = plan["ranges"][rank]
        return cls(first, last, plan["total"], resident)

    @property
    def count(self) -> int:
        return self.last - self.first

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.last == self.total

    def describe(self) -> str:
        layers = f"layers {self.first}-{self.last - 1}" if self.count else "no layers"
        kept = self.count if self.resident is None else min(self.resident, self.count)
        extra = (["embeddings"] if self.is_first else []) + (["norm + head"] if self.is_last else [])
        how = f", {kept} resident, {self.count - kept} streamed" if self.count else ""
        return layers + how + (f" + {' + '.join(extra)}" if extra else "")


class Shifted:
    """A tensor source seen as if it held only layers first.. renumbered from 0 (names outside the
    layers unchanged): the stage's k-layer model reads layer i from the file's layer first + i."""

    def __init__(self, tensors, prefix: str, first: int):
        self.tensors, self.prefix, self.first = tensors, prefix + ".", first

    def name(self, name: str) -> str:
        if not name.startswith(self.prefix):
            return name
        index, _, rest = name[len(self.prefix):].partition(".")
        return f"{self.prefix}{int(index) + self.first}.{rest}"

    def __contains__(self, name: str) -> bool:
        return self.name(name) in self.tensors

    def read(self, names: dict) -> dict:
        out = self.tensors.read({self.name(k): dt for k, dt in names.items()})
        return {k: out[self.name(k)] for k in names}

    def raw(self, name: str):
        return self.tensors.raw(self.name(name)) if hasattr(self.tensors, "raw") else None

    def kind(self, name: str) -> str:
        return self.tensors.kind(self.name(name))

    def gguf_name(self, name: str) -> str:
        return self.tensors.gguf_name(self.name(name))


@dataclass
class StageModel:
    """A stage's model (`model`: the family's causal LM with only this range's layers, embeddings only
    on the first stage, norm and head only on the last), its streaming handle and its range."""

    model: nn.Module
    range: Range
    offload: object = None

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def tensor_count(self) -> int:
        """The tensors this stage holds (parameters, streamed layers' included)."""
        return sum(1 for _ in self.model.parameters())

    @torch.no_grad()
    def run(self, cache, positions: torch.Tensor, allowed: torch.Tensor | None, *, hidden: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> torch.Tensor:
        """This stage's part of a pass: embeddings (first stage, from `tokens`), then its layers over
        `hidden`, appending to `cache`; the last stage's output is normed (its head is `logits`)."""
        if self.range.is_first:
            hidden = self.model.get_input_embeddings()(tokens.to(self.device))
        hidden = hidden.to(self.device, compute_dtype(self.model))
        if self.range.count:
            hidden = hidden_states(self.model, cache, None, positions, allowed, embeds=hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return logits_from_hidden(self.model, hidden)

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.model.parameters() if p.device.type != "meta")


def model_config(spec: str | None, dtype: torch.dtype):
    """(config, tensor source, is_gguf, folder) of a model spec, reading only headers."""
    from transformers import AutoConfig

    folder, gguf = resolve(spec)
    if gguf:
        path = Path(folder) / gguf
        config, _, source = gguf_model(path, gguf_index(str(path.parent), path.name), dtype)
        return config, source, True, folder
    source = SafetensorsTensors.find(folder)
    if source is None:
        raise UnsupportedModelError(f"{folder}: a stage reads its layers from safetensors or GGUF files; this model "
                                    "has neither. Save it with save_pretrained(safe_serialization=True).")
    return AutoConfig.from_pretrained(folder), source, False, folder


def check_family(config) -> None:
    if config.model_type not in FAMILIES:
        raise UnsupportedModelError(f"a {config.model_type} target cannot be split across machines yet: its decoder "
                                    f"changes the hidden states before the first layer. Supported: {', '.join(FAMILIES)}.")


def load_range(spec: str | None, rng: Range, device: torch.device, *, link_delay: float = 0.0,
               stream_quant: str | None = None, progress: bool = False) -> StageModel:
    """This stage's layers of `spec` (and embeddings / norm + head when first / last), nothing else."""
    dtype = run_dtype(device)
    config, source, gguf, folder = model_config(spec, dtype)
    check_family(config)
    if rng.total != config.num_hidden_layers:
        raise UnsupportedModelError(f"the placement splits {rng.total} layers but the model file has "
                                    f"{config.num_hidden_layers}: every stage must load the same model.")
    part = _part_config(config, rng)
    try:
        skeleton = meta_model(part, dtype)
        prefix = layer_prefix(skeleton) or "model.layers"
        layer_groups(skeleton, Shifted(source, prefix, rng.first))
    except Unsupported as why:
        raise UnsupportedModelError(f"cannot read a layer range of this model: {why}") from None
    _outside(skeleton, part, source, rng, dtype)
    layers = LayerSource(Shifted(source, prefix, rng.first), prefix, raw=gguf and stream_quant is None)
    handle = _place(skeleton, layers, rng, device, link_delay, stream_quant, progress)
    skeleton.generation_config = _generation_config(folder, gguf, skeleton)
    return StageModel(skeleton.eval(), rng, handle)


def _part_config(config, rng: Range):
    part = copy.deepcopy(config)
    part.num_hidden_layers = rng.count
    if getattr(part, "layer_types", None):
        part.layer_types = list(config.layer_types[rng.first:rng.last])
    return part


def _outside(model: nn.Module, config, source, rng: Range, dtype: torch.dtype) -> None:
    """Fill what this stage holds outside its layers; drop the rest (no memory for it)."""
    decoder = model.get_decoder()
    if rng.is_first:
        weight = source.read({"model.embed_tokens.weight": dtype})["model.embed_tokens.weight"]
        decoder.embed_tokens.load_state_dict({"weight": weight}, assign=True)
    else:
        decoder.embed_tokens = None
    if rng.is_last:
        decoder.norm.load_state_dict({"weight": source.read({"model.norm.weight": dtype})["model.norm.weight"]},
                                     assign=True)
        name = "lm_head.weight" if "lm_head.weight" in source else "model.embed_tokens.weight"  # tied head
        model.lm_head.load_state_dict({"weight": source.read({name: dtype})[name]}, assign=True)
    else:
        decoder.norm = nn.Identity()
        model.lm_head = None
    with torch.device("cpu"):
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    for p in model.parameters():
        p.requires_grad_(False)


def _place(model: nn.Module, layers: LayerSource, rng: Range, device: torch.device, link_delay: float,
           stream_quant: str | None, progress: bool):
    """Fill the layers: resident ones on the device, the others packed for the streamer."""
    resident = rng.count if rng.resident is None else min(rng.resident, rng.count)
    if resident < rng.count:
        return api.offload_layers(model, device, resident_layers=resident, link_delay=link_delay,
                                  quantize=stream_quant, progress=progress, source=layers)
    for i, layer in enumerate(model.get_decoder().layers):
        layers.fill(i, layer, False)
    model.to(device)
    return None


def _generation_config(folder: str, gguf: bool, model: nn.Module):
    """The model's generation_config.json where it has one (its sampling defaults), as a whole load reads it."""
    from transformers import GenerationConfig

    path = Path(folder) / "generation_config.json"
    if not gguf and path.is_file():
        return GenerationConfig(**json.loads(path.read_text()))
    return model.generation_config
