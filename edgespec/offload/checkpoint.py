"""Load a target straight into the streamer, one decoder layer at a time.

Loading a model whole and then packing its layers needs the whole model in host RAM at once: a
70B target in bf16 is 140 GB, even when its streamed layers are kept int8 (70 GB) or nf4 (39 GB).
Here transformers loads everything *outside* the decoder layers (embeddings, final norm, head,
rotary tables; a model with zero layers), the layers are built on the meta device, and each one is
read from the safetensors checkpoint, placed (kept on the device, or packed into its host buffer,
encoded if streaming quantized) and released before the next is read. Peak host RAM is then the
packed layers plus one layer, and the result is the same model as the whole-model path gives.

Checkpoints this cannot read layer by layer (no safetensors, pre-quantized weights, names that
transformers would convert) load whole, as before; `load_offloaded` says so when showing progress.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
from torch import nn

from edgespec.errors import ModelNotFoundError
from edgespec.models import quiet_transformers

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
LAYER_COUNT_KEYS = ("num_hidden_layers", "layer_types")  # config entries that follow the layer count


class Checkpoint:
    """The safetensors files of a model folder (or hub id), read a few tensors at a time."""

    def __init__(self, files: dict[str, str]):
        self.files = files  # tensor name -> file path

    @classmethod
    def find(cls, folder: str) -> "Checkpoint | None":
        """The checkpoint of `folder`, or None when it has no safetensors weights."""
        from transformers.utils import cached_file

        index = cached_file(folder, INDEX, _raise_exceptions_for_missing_entries=False)
        if index:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            paths = {name: _shard(folder, name) for name in set(weight_map.values())}
            return cls({t: paths[name] for t, name in weight_map.items()})
        single = cached_file(folder, SINGLE, _raise_exceptions_for_missing_entries=False)
        return cls({t: single for t in _keys(single)}) if single else None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The named tensors, cast to the given dtypes. Files are opened for this call only, so the
        pages they map leave the process with it."""
        from safetensors import safe_open

        out, handles = {}, {}
        try:
            for name, dtype in names.items():
                path = self.files[name]
                try:
                    if path not in handles:
                        handles[path] = safe_open(path, framework="pt")
                    t = handles[path].get_tensor(name)
                except Exception as err:  # truncated or corrupt shard
                    raise ModelNotFoundError(f"Could not read {name} from {path}: {err}. The checkpoint file is "
                                             "damaged: download it again.") from None
                out[name] = t if t.dtype == dtype else t.to(dtype)
        finally:
            handles.clear()
        return out


def _shard(folder: str, name: str) -> str:
    from transformers.utils import cached_file

    try:
        path = cached_file(folder, name)
    except OSError as err:
        raise ModelNotFoundError(f"The checkpoint in {folder} lists the shard {name}, which is missing ({err}). "
                                 "Download the model again (every model-*.safetensors file).") from None
    _keys(path)  # reads the header only: a damaged shard is named now, not deep inside a load
    return path


def _keys(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise ModelNotFoundError(f"Could not read {path}: {err}. The checkpoint file is damaged: download it "
                                 "again.") from None


class _Unsupported(Exception):
    """Why a checkpoint cannot be read layer by layer (it then loads whole)."""


def load_offloaded(spec: str | None, device: torch.device, dtype: torch.dtype, *, progress: bool = True,
                   **offload_kw) -> nn.Module:
    """Load `spec` with its decoder layers offloaded (see `offload_layers` for `offload_kw`), reading
    the layers one at a time when the checkpoint allows it, else loading the model whole first.
    A GGUF target is read from its de-quantized copy (made once, one layer at a time: edgespec/convert.py)."""
    from edgespec.models import load_model, local_folder
    from edgespec.offload.api import offload_layers

    folder = local_folder(spec, progress, dtype)  # a GGUF: de-quantized once, to the dtype it runs in
    try:
        model, ckpt, prefix = _from_safetensors(folder, dtype)
    except _Unsupported as why:
        if progress:
            print(f"edgespec: loading the target whole before streaming it ({why})", file=sys.stderr, flush=True)
        model = load_model(folder, device="cpu", dtype=dtype, progress=progress)
        handle = offload_layers(model, device, progress=progress, **offload_kw)
    else:
        dtypes = {id(layer): _dtypes(layer) for layer in _layers(model)}
        fill = lambda i, layer: _fill(layer, ckpt, f"{prefix}.{i}.", dtypes[id(layer)])  # noqa: E731
        handle = offload_layers(model, device, progress=progress, fill=fill, **offload_kw)
    model._edgespec_offload = handle
    return model


def _from_safetensors(folder: str, dtype: torch.dtype):
    """(model with meta decoder layers, checkpoint, layer-name prefix) for a safetensors folder."""
    from transformers import AutoConfig

    ckpt = Checkpoint.find(folder)
    if ckpt is None:
        raise _Unsupported("no safetensors checkpoint")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):
        raise _Unsupported("a pre-quantized checkpoint")
    layers, prefix = _layer_names_in(_skeleton(config, dtype), ckpt)
    return _graft(_outside_only(folder, config, dtype), layers), ckpt, prefix


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The whole model on the meta device (no memory): the layers to fill, and the names to read."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise _Unsupported("its config names no decoder layer count")
    with torch.device("meta"):
        return _build(config, dtype)


def _layer_names_in(skeleton: nn.Module, ckpt) -> tuple[nn.ModuleList, str]:
    """The skeleton's decoder layers and their name prefix, once `ckpt` is known to hold them all."""
    layers = _layers(skeleton)
    prefix = layer_prefix(skeleton)
    if len(layers) != skeleton.config.num_hidden_layers or prefix is None:
        raise _Unsupported("its decoder layers are not at model.get_decoder().layers")
    missing = [k for i, layer in enumerate(layers) for k in _names(layer, f"{prefix}.{i}.") if k not in ckpt]
    if missing:
        raise _Unsupported(f"the checkpoint names its layer weights differently (no {missing[0]})")
    if any(not _persistent(layer) for layer in layers):
        raise _Unsupported("its decoder layers hold non-persistent buffers")
    return layers, prefix


def _build(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _graft(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """Put the meta decoder layers into the zero-layer model, sharing its config object."""
    _layers(model).extend(layers)
    for layer in layers:
        for mod in layer.modules():
            if hasattr(mod, "config") and type(mod.config) is type(model.config):
                mod.config = model.config
    return model


def _zero_layers(config):
    """A copy of `config` with no decoder layers, and the entries to restore afterwards."""
    empty = copy.deepcopy(config)
    saved = {k: getattr(config, k) for k in LAYER_COUNT_KEYS if getattr(config, k, None) is not None}
    empty.num_hidden_layers = 0
    if "layer_types" in saved:
        empty.layer_types = []
    return empty, saved


def _outside_only(folder: str, config, dtype: torch.dtype) -> nn.Module:
    """transformers' own load of everything but the decoder layers (a zero-layer copy of the model)."""
    from transformers import AutoModelForCausalLM

    empty, saved = _zero_layers(config)
    try:
        with quiet_transformers():  # the layers' weights are "unexpected" to a zero-layer model
            model = AutoModelForCausalLM.from_pretrained(folder, config=empty, dtype=dtype)
    except Exception as err:  # noqa: BLE001 — shards were checked in Checkpoint.find: an architecture
        raise _Unsupported(f"transformers cannot load it without its layers: {type(err).__name__}: {err}") from None
    for k, v in saved.items():
        setattr(model.config, k, v)
    return model.eval()


def _fill(layer: nn.Module, ckpt: Checkpoint, prefix: str, dtypes: dict[str, torch.dtype]) -> None:
    """Give a meta decoder layer its real weights, on the host."""
    state = ckpt.read({prefix + k: dt for k, dt in dtypes.items()})
    layer.load_state_dict({k[len(prefix):]: t for k, t in state.items()}, strict=True, assign=True)
    for p in layer.parameters():
        p.requires_grad_(False)


def _dtypes(layer: nn.Module) -> dict[str, torch.dtype]:
    return {k: t.dtype for k, t in layer.state_dict(keep_vars=True).items()}


def _names(layer: nn.Module, prefix: str) -> list[str]:
    return [prefix + k for k in layer.state_dict(keep_vars=True)]


def _persistent(layer: nn.Module) -> bool:
    return all(not mod._non_persistent_buffers_set for mod in layer.modules())


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def layer_prefix(model: nn.Module) -> str | None:
    """The state-dict name of the decoder layers' ModuleList ("model.layers" for Llama), or None."""
    layers = _layers(model)
    return next((name for name, mod in model.named_modules() if mod is layers), None)
