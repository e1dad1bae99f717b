#!/usr/bin/env python
"""Every path only a GPU runs, at tiny shapes, each checked against its CPU reference (scripts/gpu_check.sh
runs it, then the 8B-shape figures); `--device cpu` runs the same on a CPU, the kernels interpreted (CI).

    python scripts/gpu_check.py --device cuda [--steps codecs,gguf,padded,bnb,self,graphs] [--gguf FILE]

Steps (PASS or FAIL per check; the exit code is the number of failures, at most 100):
  codecs  int8, nf4: a weight encoded on the device (into a device and a host region) gives the host's
          bytes; decoded there (fused kernel, torch code, bitsandbytes' kernel for nf4 on CUDA) into
          fp32 / bf16 / fp16, the host torch decode's bits
  gguf    every GGUF type, random valid blocks, decoded on the device (kernel, torch): gguf-py's bits
  padded  a padded 70B-shape layer (a CPU: llama-70b-tiny) built on the device with each --stream-quant,
          copied and decoded into a device slot as the streamer does: every tensor the torch decode's
  bnb     the self-drafter's bitsandbytes copies (nf4, fp4, int8) of a weight on the host and of one
          already on the device: the same codes; each forward near its de-quantized matmul
  self    a tiny offloaded target drafting for itself (int8, nf4): every streamed linear a quantized copy,
          the drafter's logits near the target's
  graphs  the drafter's lean forward over its static cache (CUDA graphs on a GPU): transformers' hidden
          states, graphs captured, none refused
  file    (--gguf FILE[,FILE]; "embedded": the default model) every quantized tensor, its first --rows rows
          (0: all), through the kernel on the device: gguf-py's bits
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.offload import gguf_blocks, kernels  # noqa: E402
from edgespec.offload.codecs import CODECS, GGUFRaw, make_codec  # noqa: E402
from edgespec.offload.layout import LayerPack, make_slots  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEPS = ("codecs", "gguf", "padded", "bnb", "self", "graphs")
SELF_ERROR = {"int8": 0.05, "nf4": 0.5}  # bounds on the self-drafter's relative logit error (random tiny model)
FAILED: list[str] = []


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {what}{f'  ({detail})' if detail and not ok else ''}", flush=True)
    if not ok:
        FAILED.append(what)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().contiguous(), b.detach().to(a.device).contiguous()  # compared where `a` is
    ints = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]),
                                                                     b.view(ints[b.element_size()]))


# the decode paths checked: the default (on CUDA the kernel, or bitsandbytes' for nf4; on a CPU here the
# kernel too: `main` sets `kernels.everywhere`), the kernel, the torch code
FUSED = {None: "default", True: "fused kernel", False: "torch"}


# ---- steps ------------------------------------------------------------------------------------------
def step_codecs(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    w_host = torch.randn(37, 320, generator=gen) * torch.logspace(-3, 0, 320)
    for name in CODECS:
        host, dev = make_codec(name), make_codec(name)
        dev.prepare(device)
        region = torch.zeros(host.nbytes(w_host.shape), dtype=torch.uint8)
        host.encode_into(w_host, region)
        on_dev = torch.zeros_like(region, device=device)
        dev.encode_into(w_host.to(device), on_dev)
        to_host = torch.zeros_like(region)
        dev.encode_into(w_host.to(device), to_host)  # the padded-layer case: the weight on the device
        check(f"{name} encoded on {device.type} == encoded on the host",
              same_bits(on_dev, region) and same_bits(to_host, region))
        for dtype in DTYPES:
            want = torch.empty(w_host.shape, dtype=dtype)
            host.decode_into(region, want, fused=False)
            for fused, path in FUSED.items():
                got = torch.empty(w_host.shape, dtype=dtype, device=device)
                dev.decode_into(region.to(device), got, fused=fused)
                check(f"{name} decode on {device.type} ({path}) -> {str(dtype)[6:]} == host decode",
                      same_bits(got, want))


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random valid blocks of `kind` for a (rows, cols) weight: random codes, finite fp16 scales."""
    t = gguf_blocks.TYPES[kind]
    gen = torch.Generator().manual_seed(seed)
    n = rows * cols // t.block
    raw = torch.randint(0, 256, (n, t.size), dtype=torch.uint8, generator=gen)
    for at in gguf_blocks.FP16_FIELDS[kind]:
        size = torch.tensor([1e-2, 1.0, 1e-6, 0.0])[torch.randint(0, 4, (n,), generator=gen)]  # normal .. zero
        scale = torch.randn(n, generator=gen) * size
        raw[:, at : at + 2] = scale.half().view(torch.uint8).view(n, 2)
    return raw.view(-1)


def step_gguf(device: torch.device) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for kind, t in gguf_blocks.TYPES.items():
        if t.decode is None:
            continue
        rows, cols = (37, 96) if t.block == 32 else (9, 768)
        raw = random_blocks(kind, rows, cols)
        with np.errstate(over="ignore"):
            ref = dequantize(raw.numpy().reshape(rows, -1), GGMLQuantizationType[kind])
        ref = torch.from_numpy(np.ascontiguousarray(ref))
        for dtype in DTYPES[:2]:
            for fused, path in FUSED.items():
                got = torch.empty(rows, cols, dtype=dtype, device=device)
                with np.errstate(over="ignore"):
                    GGUFRaw(kind).decode_into(raw.to(device), got, fused=fused)
                check(f"{kind} on {device.type} ({path}) -> {str(dtype)[6:]} == gguf.quants.dequantize",
                      same_bits(got, ref.to(dtype)))


def small_llama(hidden: int = 64, layers: int = 2, seed: int = 0, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def step_padded(device: torch.device) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from edgespec.offload.padded import PaddedLayers, padded_config

    shape = "llama-70b" if device.type == "cuda" else "llama-70b-tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = small_llama().to(dtype)
    big = padded_config(small.config, shape)
    for quant in (None, *CODECS):
        t0 = time.perf_counter()
        with torch.device("meta"):
            layer = LlamaDecoderLayer(big, 0).to(dtype)
        PaddedLayers(small, big, device).fill(0, layer, streamed=True)
        built = {(id(m), n): t.detach().clone() for m in layer.modules()
                 for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
        codec = make_codec(quant)
        pack = LayerPack.pack(0, layer, codec, pin=device.type == "cuda")
        if codec is not None:
            codec.prepare(device)
        (slot,) = make_slots([pack], 1, device)
        pack.load(slot)
        want = [torch_decode(pack, e, device) if e.codec else built[id(e.targets[0][0]), e.targets[0][1]]
                for e in pack.entries]
        ok = all(same_bits(got, w) for got, w in zip(pack._views[slot.index], want))
        check(f"padded {shape} layer built on {device.type}, --stream-quant {quant or 'none'}: slot == torch decode",
              ok, f"{time.perf_counter() - t0:.1f}s")
        del pack, slot, layer, built


def torch_decode(pack: LayerPack, entry, device: torch.device) -> torch.Tensor:
    """`entry` decoded from the pack's host bytes by the torch code on `device` (the reference: the
    codecs step checks it against the host's at small shapes; the host would take seconds at 70B)."""
    out = torch.empty(entry.shape, dtype=entry.dtype, device=device)
    region = pack.host[entry.host_offset : entry.host_offset + entry.host_nbytes].to(device)
    entry.codec.decode_into(region, out, fused=False)
    return out


def step_bnb(device: torch.device) -> None:
    from edgespec.loading import lowbit

    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=gen) * 0.05)
    on_device = nn.Linear(128, 96, bias=True, device=device)
    on_device.load_state_dict(linear.state_dict())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(5, 128, generator=gen).to(device, dtype)
    for codec in ("nf4", "fp4", "int8"):
        a = lowbit.quantize(linear, codec, device, dtype)
        b = lowbit.quantize(on_device, codec, device, dtype)
        sa, sb = lowbit.tensors(a, codec)[0], lowbit.tensors(b, codec)[0]
        check(f"{codec} copy of a weight already on {device.type} == of the host weight",
              sa.keys() == sb.keys() and all(same_bits(sa[k], sb[k]) for k in sa))
        with torch.no_grad():
            want = nn.functional.linear(x, lowbit.dequantized(a, codec).to(dtype), linear.bias.to(device, dtype))
            err = ((a(x) - want).float().norm() / want.float().norm()).item()
        check(f"{codec} copy's forward on {device.type} near its de-quantized matmul", err < 0.05,
              f"rel. error {err:.4f}")


def step_self(device: torch.device) -> None:
    from edgespec.loading import lowbit, self_drafter
    from edgespec.offload import offload_layers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4)).to(device)
    for codec in ("int8", "nf4"):
        target = small_llama(hidden=128, layers=4).to(dtype)
        handle = offload_layers(target, device, resident_layers=1, progress=False)
        draft = self_drafter.build(target, handle, codec, progress=False)
        layers = self_drafter.decoder_layers(draft.model)
        copies = [m for i in draft.copies for m in layers[i].modules() if lowbit.is_copy(m)]
        packed = all(m.weight.dtype in (torch.int8, torch.uint8) for m in copies)
        check(f"self-drafter {codec} copies on {device.type}: every streamed linear quantized",
              len(copies) == 7 * len(draft.copies) and packed,
              f"{len(copies)} copies, dtypes {set(m.weight.dtype for m in copies)}")
        with torch.no_grad():
            want, got = target(ids).logits.float(), draft.model(ids).logits.float()
        err = ((got - want).norm() / want.norm()).item()  # 3 streamed layers of ~0.8 % (int8), ~10 % (nf4) weight error
        check(f"self-drafter {codec} logits near the target's on {device.type}", err < SELF_ERROR[codec],
              f"rel. error {err:.3f}")
        handle.remove()


def step_graphs(device: torch.device) -> None:
    from edgespec.core.draft_runner import DraftRunner
    from edgespec.core.static_kv import GraphFallbackWarning, StaticKV

    model = small_llama().to(device)
    outs = {}
    for how in ("transformers", "static"):
        draft = DraftRunner(model, how)
        cache = draft.new_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphFallbackWarning)
            try:
                outs[how] = [_feeds(draft, cache), _feeds(draft, cache, 40)]
            except GraphFallbackWarning as err:
                check("CUDA graphs captured and replayed without a fallback", False, str(err))
                return
        if how == "static":
            graphs = isinstance(cache, StaticKV) and len(getattr(cache, "_graphs", {})) > 0
            check(f"static drafter cache on {device.type}: graphs captured = {graphs}",
                  graphs == (device.type == "cuda"), draft.describe(cache))
    ok = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for x, y in zip(outs["transformers"], outs["static"])
             for a, b in zip(x, y))
    check(f"lean static forward (replayed) == transformers forward on {device.type}", ok)


def _feeds(draft, cache, start: int = 0) -> list[torch.Tensor]:
    """A stem, a two-branch tree over it, a pruning to one branch, one more token (twice: replays)."""
    with torch.no_grad():
        out = [draft.hidden_states(cache, torch.arange(10) + start, torch.arange(10), None)]
        allowed = torch.ones(3, 13, dtype=torch.bool)
        allowed[:, 10:] = torch.eye(3, dtype=torch.bool)
        allowed[2, 10] = True
        out.append(draft.hidden_states(cache, torch.tensor([5, 6, 7]), torch.tensor([10, 10, 11]), allowed))
        cache.keep(torch.tensor([*range(10), 10, 12]))
        out.append(draft.hidden_states(cache, torch.tensor([3]), torch.tensor([12]), None))
        cache.crop_to(0)
    return [o.float().cpu() for o in out]


def step_file(device: torch.device, files: str, rows: int) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from edgespec.loading.resolve import embedded_gguf

    for path in files.split(","):
        path = str(embedded_gguf(fetch=False)) if path == "embedded" else path
        seen: dict[str, int] = {}
        for t in GGUFReader(path).tensors:
            kind = t.tensor_type.name
            if kind not in gguf_blocks.TYPES or gguf_blocks.TYPES[kind].decode is None:
                continue
            raw = np.asarray(t.data).reshape(t.data.shape[0] if t.data.ndim > 1 else 1, -1)[: rows or None]
            raw = np.array(raw.reshape(-1, raw.shape[-1]), copy=True)  # contiguous, writable
            want = torch.from_numpy(np.ascontiguousarray(dequantize(raw, t.tensor_type)))
            got = torch.empty(want.shape, dtype=torch.float32, device=device)
            GGUFRaw(kind).decode_into(torch.from_numpy(raw).view(-1).to(device), got, fused=True)
            if not same_bits(got, want):
                check(f"{Path(path).name} {t.name} ({kind}) through the kernel == gguf.quants.dequantize", False)
            seen[kind] = seen.get(kind, 0) + 1
        check(f"{Path(path).name}: every quantized tensor ({', '.join(f'{n} {k}' for k, n in seen.items())}), "
              f"{'all' if not rows else f'first {rows}'} rows, through the kernels == gguf.quants.dequantize",
              bool(seen) and not any(Path(path).name in f for f in FAILED))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--gguf", default=None, help="also check these GGUF files' tensors (comma list; 'embedded')")
    ap.add_argument("--rows", type=int, default=0, help="--gguf: rows checked per tensor (0: all)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type == "cpu":
        kernels.everywhere()  # the GPU's decode path (interpreted) wherever a slot is decoded
    print(f"kernels: {'interpreted' if kernels.interpreted() else 'compiled'} Triton"
          if kernels.available() else f"kernels: not available ({kernels.unavailable_reason()})")
    steps = args.steps.split(",") + (["file"] if args.gguf else [])
    for name in steps:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            globals()[f"step_{name}"](*((device, args.gguf, args.rows) if name == "file" else (device,)))
        except Exception as err:  # noqa: BLE001 — a step that cannot run is a failed check, the others go on
            traceback.print_exc()
            check(f"{name} ran", False, f"{type(err).__name__}: {err}")
        print(f"   ({name}: {time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"gpu_check: {len(FAILED)} failed" + (": " + "; ".join(FAILED) if FAILED else ""))
    return min(len(FAILED), 100)


if __name__ == "__main__":
    sys.exit(main())
