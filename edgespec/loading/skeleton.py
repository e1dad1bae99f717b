"""A model built without its decoder layers' weights: the skeleton a layer-by-layer load fills.

`meta_model` builds the whole model on the meta device (no memory: its names, shapes and dtypes);
`outside_from_folder` / `outside_from_tensors` load everything *outside* the decoder layers through
transformers (a zero-layer copy of the model: embeddings, final norm, head, rotary tables), and
`graft` puts the meta decoder layers into it, to be filled one at a time by the placement step.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from edgespec.base.quiet import quiet_transformers
from edgespec.loading.tensors import Unsupported
from edgespec.base import reach

LAYER_COUNT_KEYS = ("num_hidden_layers", "layer_types")  # config entries that follow the layer count


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The whole model on the meta device (no memory): the layers to fill, and the names to read."""
    from transformers import AutoModelForCausalLM

    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise Unsupported("its config names no decoder layer count")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def layer_prefix(model: nn.Module) -> str | None:
    """The state-dict name of the decoder layers' ModuleList ("model.layers" for Llama), or None."""
    layers = decoder_layers(model)
    return next((name for name, mod in model.named_modules() if mod is layers), None)


def layer_names(layer: nn.Module, prefix: str = "") -> list[str]:
    return [prefix + k for k in layer.state_dict(keep_vars=True)]


def layer_dtypes(layer: nn.Module) -> dict[str, torch.dtype]:
    return {k: t.dtype for k, t in layer.state_dict(keep_vars=True).items()}


def layer_groups(skeleton: nn.Module, source) -> tuple[str, list[str], list[list[str]]]:
    """(layer prefix, names outside the layers, names per layer) of `skeleton`, once `source` is known
    to hold every layer tensor (names outside that it lacks are left to transformers: tied heads)."""
    layers, prefix = decoder_layers(skeleton), layer_prefix(skeleton)
    if len(layers) != skeleton.config.num_hidden_layers or prefix is None:
        raise Unsupported("its decoder layers are not at model.get_decoder().layers")
    per_layer = [layer_names(layer, f"{prefix}.{i}.") for i, layer in enumerate(layers)]
    missing = [k for names in per_layer for k in names if k not in source]
    if missing:
        raise Unsupported(f"the checkpoint names its layer weights differently (no {missing[0]})")
    if any(not _persistent(layer) for layer in layers):
        raise Unsupported("its decoder layers hold non-persistent buffers")
    inside = {k for names in per_layer for k in names}
    outside = [k for k in skeleton.state_dict(keep_vars=True) if k not in inside and k in source]
    return prefix, outside, per_layer


def graft(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """Put the meta decoder layers into the zero-layer model, sharing its config object."""
    decoder_layers(model).extend(layers)
    for layer in layers:
        for mod in layer.modules():
            if hasattr(mod, "config") and type(mod.config) is type(model.config):
                mod.config = model.config
    return model


def outside_from_folder(folder: str, config, dtype: torch.dtype) -> nn.Module:
    """transformers' own load of everything but the decoder layers from a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    return _zero_layer_load(config, lambda empty: AutoModelForCausalLM.from_pretrained(folder, config=empty,
                                                                                       dtype=dtype))


def outside_from_tensors(kind: type, config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The same from tensors already read (a GGUF's, de-quantized), through transformers' loader;
    `kind`: the model class (that of the meta model)."""
    return _zero_layer_load(config, lambda empty: kind.from_pretrained(None, config=empty, state_dict=state,
                                                                         dtype=dtype))


def _zero_layer_load(config, load) -> nn.Module:
    empty, saved = _zero_layers(config)
    try:
        with quiet_transformers():  # the layers' weights are "unexpected" to a zero-layer model
            model = load(empty)
    except Exception as err:  # noqa: BLE001 — tensors were checked before: an architecture's own checks
        raise Unsupported(f"transformers cannot load it without its layers: {type(err).__name__}: {err}") from None
    for k, v in saved.items():
        setattr(model.config, k, v)
    return model.eval()


def _zero_layers(config):
    """A copy of `config` with no decoder layers, and the entries to restore afterwards."""
    empty = copy.deepcopy(config)
    saved = {k: getattr(config, k) for k in LAYER_COUNT_KEYS if getattr(config, k, None) is not None}
    empty.num_hidden_layers = 0
    if "layer_types" in saved:
        empty.layer_types = []
    return empty, saved


def _persistent(layer: nn.Module) -> bool:
    return all(not reach.non_persistent_buffers(mod) for mod in layer.modules())


def gguf_model(path: Path, index: Path, dtype: torch.dtype):
    """(config, meta model, tensor source) of the GGUF at `path`, from its `index` (the folder
    convert.gguf_index keeps: the config transformers parsed from the file's metadata, and the
    file's tensor table): the config named as the model it builds, the tensors by HF name."""
    import json

    from transformers import AutoConfig

    from edgespec.loading.tensors import GGUFTensors

    config = AutoConfig.from_pretrained(index)
    skeleton = meta_model(config, dtype)
    config.dtype, config.architectures = dtype, [type(skeleton).__name__]
    table = json.loads((index / "tensors.json").read_text())
    return config, skeleton, GGUFTensors(str(path), skeleton, table)
