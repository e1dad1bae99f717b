"""The self-drafter: the target drafts for itself (SubSpec-style), no second model to choose or load.

The drafting model is a transformers model of the target's own class whose
- embedding, final norm, LM head and rotary tables are the target's own modules (the same tensors);
- resident decoder layers are new layer modules holding the target's very tensors (no copy): there the
  drafter computes exactly what the target computes;
- streamed decoder layers are low-bit copies (edgespec/loading/lowbit.py) kept on the device, made once from the
  weights the target streams — its packed host bytes, decoded one layer at a time on the device, so the
  copy is of the model that runs (GGUF blocks, `--stream-quant` codes) and the whole model is never in
  host memory — and saved in edgespec's cache (one safetensors file per layer), so the next load reads
  them back instead of quantizing.

It never calls the target's layer modules: the streamer's hooks sit on every one of them (resident ones
included), and a drafter running them would disturb the ring and its statistics, or race the target pass
it overlaps. When the out-of-memory back-off streams a resident layer from then on (OffloadHandle.demote),
the drafter quantizes its copy of that layer from the tensors it still holds, and their device memory is
freed. The drafter only proposes tokens: whatever its layers compute, the output is the target's.

KV cache: the drafter's entries for the leading shared layers equal the target's for the committed tokens
(up to the rounding of different batch shapes), but each model keeps its own. Sharing them would save
`describe()["kv_shareable_bytes_per_token"]` of device memory per token (the shared layers' K and V); it
is not done because the two caches hold different rows — the drafter's keeps the drafted subtree under
the last token (re-rooted each step) and is written by the search while the target pass appends the tree
to its own (overlap) — so a shared layer would need a two-part cache (the target's committed rows + the
drafter's tree rows) and attention over both, where a copy is exact and simple.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from edgespec.loading import lowbit
from edgespec.base.device import compute_dtype, model_device
from edgespec.base.errors import UnsupportedModelError
from edgespec.base.files import write_file
from edgespec.loading.memory_plan import kv_layer_bytes
from edgespec.base.quiet import quiet_transformers
from edgespec.loading.skeleton import decoder_layers, layer_prefix
from edgespec.base import reach


@dataclass
class SelfDraft:
    """A built self-drafter: `model` (a transformers model object: Engine's drafter, or HF assisted
    generation's assistant), which target layers it shares and which it runs as `codec` copies."""

    model: nn.Module
    codec: str
    shared: list[int]
    copies: list[int]
    copy_bytes: int  # device bytes the copies hold (everything else is the target's)
    kv_layer_bytes: int  # K and V bytes per token of one layer
    plan: object = None  # the pair's memory plan (edgespec/loading/memory_plan.py), when one chose the layout
    _device: torch.device = field(default=torch.device("cpu"), repr=False)

    def describe(self) -> dict:
        """For `edgespec profile`, chat's /stats, the server's /v1/models and `generate --json`."""
        first = next(iter(self.copies), len(self.shared))  # the leading layers the KV could share
        out = {"codec": self.codec, "shared_layers": len(self.shared), "copied_layers": len(self.copies),
               "copy_bytes": self.copy_bytes, "kv_shareable_bytes_per_token": first * self.kv_layer_bytes}
        if self.plan is not None:
            out["plan"] = self.plan.describe()
        return out

    def line(self) -> str:
        text = (f"self-drafter: {len(self.shared)} target layers shared (the same tensors), {len(self.copies)} "
                f"{self.codec} copies ({self.copy_bytes / 2**20:,.1f} MiB on {self._device.type})")
        return text + (f"; {self.plan.line()}" if self.plan is not None else "")

    def demoted(self, indices: list[int]) -> None:
        """OffloadHandle.demote moved these target layers to streaming: copy them low-bit now (from the
        tensors this drafter still holds, which then leave the device)."""
        layers = decoder_layers(self.model)
        dtype = compute_dtype(self.model)
        for i in indices:
            if i in self.shared:
                quantize_layer(layers[i], self.codec, self._device, dtype)
                self.shared.remove(i)
                self.copies = sorted(self.copies + [i])
                self.copy_bytes += own_bytes(layers[i])


def build(target: nn.Module, handle=None, codec: str = "nf4", *, cache: Path | None = None, plan=None,
          progress: bool = True) -> SelfDraft:
    """The self-drafter of `target`; `handle` its OffloadHandle (None: not offloaded, every layer shared);
    `cache`: the folder its copies are saved in and read back from (None: not saved)."""
    lowbit.check(codec)
    device, dtype = model_device(target), compute_dtype(target)
    drafter = skeleton(target, dtype)
    share_outside(drafter, target)
    packs = {p.index: p for p in handle.packs} if handle is not None else {}
    store = CopyStore(cache) if cache is not None else None
    mine, theirs = decoder_layers(drafter), decoder_layers(target)
    with tqdm(total=len(packs), desc=f"edgespec: {codec} copies of the streamed layers", unit="layer",
              disable=not (progress and packs)) as bar:
        for i, (layer, own) in enumerate(zip(mine, theirs)):
            if i not in packs:
                share_layer(layer, own)
                continue
            if store is None or not store.load(i, layer, codec, device, dtype):
                fill_from_pack(layer, packs[i], own, device)
                quantize_layer(layer, codec, device, dtype)
                if store is not None:
                    store.save(i, layer, codec)
            bar.update()
    check_loaded(drafter)
    drafter.config.name_or_path += f"-{codec}" if packs else ""  # calibration keys tell the layouts apart
    for p in drafter.parameters():
        p.requires_grad_(False)
    result = SelfDraft(drafter.eval(), codec, [i for i in range(len(mine)) if i not in packs], sorted(packs),
                       sum(own_bytes(mine[i]) for i in packs), kv_layer_bytes(target.config, dtype), plan, device)
    if handle is not None:
        handle.on_demote.append(result.demoted)
    return result


# ---- the model ------------------------------------------------------------------------------------
def skeleton(target: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A model of the target's class and config on the meta device (no memory), to be filled."""
    config = copy.deepcopy(target.config)
    with torch.device("meta"), quiet_transformers():
        model = reach.model_from_config(type(target), config, dtype)
    model.generation_config = copy.deepcopy(target.generation_config)
    model.config.name_or_path = f"{getattr(target.config, 'name_or_path', '') or type(target).__name__}:self"
    return model


def share_outside(drafter: nn.Module, target: nn.Module) -> None:
    """Everything outside the decoder layers becomes the target's own modules and tensors."""
    path = layer_prefix(target)
    if path is None or layer_prefix(drafter) != path:
        raise UnsupportedModelError(f"{type(target).__name__}: its decoder layers are not at "
                                    "model.get_decoder().layers, so it cannot draft for itself; pass --draft.")
    mine, theirs = drafter, target
    for step in path.split("."):
        _share_tensors(mine, theirs)
        for name, child in theirs.named_children():
            if name != step:
                mine.add_module(name, child)
        mine, theirs = mine.get_submodule(step), theirs.get_submodule(step)


def share_layer(layer: nn.Module, target_layer: nn.Module) -> None:
    """`layer` (a fresh module of the same class) holds `target_layer`'s very tensors."""
    for name, mod in layer.named_modules():
        _share_tensors(mod, target_layer.get_submodule(name))


def _share_tensors(mine: nn.Module, theirs: nn.Module) -> None:
    a = {(name, is_param) for name, _, is_param in reach.own_tensors(mine)}
    b = list(reach.own_tensors(theirs))
    if a != {(name, is_param) for name, _, is_param in b}:
        raise UnsupportedModelError(f"{type(theirs).__name__}'s tensors {sorted(n for n, _, _ in b)} differ from a "
                                    f"fresh module's {sorted(n for n, _ in a)}: this model cannot draft for itself; "
                                    "pass --draft.")
    for name, t, is_param in b:
        reach.bind(mine, name, t, is_param)


def fill_from_pack(layer: nn.Module, pack, target_layer: nn.Module, device: torch.device) -> None:
    """Give `layer` the weights target layer `pack.index` streams, decoded on `device`."""
    paths = {id(m): p for p, m in target_layer.named_modules()}
    for entry in pack.entries:
        tensor = pack.decoded(entry, device)
        for mod, attr in entry.targets:
            mine = layer.get_submodule(paths[id(mod)])
            reach.bind(mine, attr, nn.Parameter(tensor, requires_grad=False) if entry.is_param else tensor,
                       entry.is_param)


def quantize_layer(layer: nn.Module, codec: str, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the layer's linear modules by their `codec` copies on `device`; the rest moves there."""
    for mod in list(layer.modules()):
        for name, child in list(mod.named_children()):
            if lowbit.applies(child, codec):
                mod.add_module(name, lowbit.quantize(child, codec, device, dtype))
    for mod in layer.modules():
        if lowbit.is_copy(mod):
            continue
        for name, t, is_param in list(reach.own_tensors(mod)):
            if t.device != device:
                moved = nn.Parameter(t.data.to(device), requires_grad=False) if is_param else t.to(device)
                reach.bind(mod, name, moved, is_param)


def check_loaded(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UnsupportedModelError(f"{type(model).__name__}: the self-drafter found no weights for {left[:3]}: "
                                    "this model cannot draft for itself; pass --draft.")


def own_bytes(layer: nn.Module) -> int:
    """Device bytes `layer` holds: its low-bit copies' tensors and its dense ones."""
    copies = sum(lowbit.nbytes(m) for m in layer.modules() if lowbit.is_copy(m))
    return copies + sum(t.numel() * t.element_size() for _, t in _dense(layer))


# ---- the saved copies -----------------------------------------------------------------------------
class CopyStore:
    """One safetensors file per copied layer in `folder`: each low-bit module's tensors (lowbit.tensors)
    and the layer's dense tensors (norms), with the module paths and shapes in the file's metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, i: int) -> Path:
        return self.folder / f"layer{i:04d}.safetensors"

    def save(self, i: int, layer: nn.Module, codec: str) -> None:
        """Write layer i's copy; a failure only means quantizing again next time."""
        from safetensors.torch import save

        tensors, copies = {}, {}
        for name, mod in layer.named_modules():
            if lowbit.is_copy(mod):
                state, meta = lowbit.tensors(mod, codec)
                copies[name] = meta
                tensors.update({f"copy/{name}/{k}": v.contiguous() for k, v in state.items()})
        for name, t in _dense(layer):
            tensors[f"dense/{name}"] = t.contiguous()
        try:
            data = save({k: v.detach().cpu() for k, v in tensors.items()},
                        metadata={"codec": codec, "copies": json.dumps(copies)})
            write_file(self.path(i), data)
        except Exception:  # noqa: BLE001 — disk full, unwritable cache, ...
            pass

    def load(self, i: int, layer: nn.Module, codec: str, device: torch.device, dtype: torch.dtype) -> bool:
        """Fill `layer` (meta) from layer i's file; False (a damaged file deleted) when there is none."""
        path = self.path(i)
        if not path.is_file():
            return False
        try:
            self._fill(path, layer, codec, device, dtype)
            return True
        except Exception:  # noqa: BLE001 — a damaged or stale file: quantize again
            path.unlink(missing_ok=True)
            return False

    @staticmethod
    def _fill(path: Path, layer: nn.Module, codec: str, device, dtype) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata()
            if meta.get("codec") != codec:
                raise ValueError("another codec")
            state = {k: f.get_tensor(k) for k in f.keys()}
        for name, info in json.loads(meta["copies"]).items():
            prefix = f"copy/{name}/"
            parts = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            parent, _, attr = name.rpartition(".")
            layer.get_submodule(parent).add_module(attr, lowbit.restore(parts, info, codec, device, dtype))
        for name, t in _dense(layer, meta_only=True):
            mod_path, _, attr = name.rpartition(".")
            mod = layer.get_submodule(mod_path)
            value = state[f"dense/{name}"]
            is_param = any(n == attr for n, _ in mod.named_parameters(recurse=False))
            reach.bind(mod, attr, nn.Parameter(value, requires_grad=False) if is_param else value, is_param)
        check_loaded(layer)


def _dense(layer: nn.Module, meta_only: bool = False):
    """(name, tensor) of the layer's tensors outside its low-bit copies."""
    skip = {id(m) for c in layer.modules() if lowbit.is_copy(c) for m in c.modules()}
    for name, mod in layer.named_modules():
        if id(mod) in skip:
            continue
        for attr, t, _ in reach.own_tensors(mod):
            if t.is_meta or not meta_only:
                yield (f"{name}.{attr}" if name else attr), t
