"""Layer streaming (edgespec.offload) on CPU: the copy-thread transport runs the same ring, slots
and hooks as the CUDA stream transport, so exactness, prefetch and overlap are all tested here."""
from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from edgespec.base.errors import InvalidArgumentError, UnsupportedModelError
from edgespec.core.forward import cache_kwarg
from edgespec.offload import find_handle, offload_layers
from tests.conftest import tiny_model

def make(arch: str = "llama", layers: int = 4, dtype=torch.float32, seed: int = 0, **extra):
    return tiny_model(arch, seed, vocab=128, layers=layers, hidden=64, **extra).to(dtype)


def pair(arch="llama", resident=0, ring=2, **kw):
    """(offloaded model, plain deep copy made before offloading, handle)."""
    opts = {k: kw.pop(k) for k in ("quantize", "link_delay") if k in kw}
    model = make(arch, **kw)
    plain = copy.deepcopy(model)
    handle = offload_layers(model, "cpu", resident_layers=resident, ring=ring, progress=False, **opts)
    return model, plain, handle


def tree_step(past: int, q: int = 5):
    """A small tree under `past` cached tokens: bool mask (1, 1, q, past + q) and positions."""
    parents = [-1, 0, 0, 1, 1][:q]
    anc = torch.zeros(q, q, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
        depth.append(0 if p < 0 else depth[p] + 1)
    mask = torch.cat([torch.ones(q, past, dtype=torch.bool), anc], dim=1)[None, None]
    return mask, (past + torch.tensor(depth))[None]


def run_steps(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, three single-token steps, then a tree step with a custom 4-D mask; all logits."""
    cache, out = DynamicCache(), []
    with torch.no_grad():
        out.append(model(ids[:, :6], use_cache=True, **kv(cache)).logits)
        for t in range(6, 9):
            out.append(model(ids[:, t : t + 1], use_cache=True, **kv(cache)).logits)
        mask, pos = tree_step(cache.get_seq_length())
        out.append(model(ids[:, 9:14], attention_mask=mask, position_ids=pos, use_cache=True, **kv(cache)).logits)
    return out


IDS = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(0))


# ---- 1. exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("ring", [1, 2, 3])
@pytest.mark.parametrize("resident", [0, 2, 4])
def test_llama_logits_match(resident, ring):
    model, plain, handle = pair("llama", resident, ring)
    assert (handle.resident_layers, handle.streamed_layers) == (resident, 4 - resident)
    for a, b in zip(run_steps(model, IDS), run_steps(plain, IDS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("resident,ring", [(0, 2), (2, 1), (1, 3)])
def test_other_archs_logits_match(arch, resident, ring):
    model, plain, _ = pair(arch, resident, ring)
    for a, b in zip(run_steps(model, IDS), run_steps(plain, IDS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_mode(dtype):
    model, plain, _ = pair("llama", 1, 2, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):  # repeated calls, no autograd
            torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=0, rtol=0)


def test_tied_embeddings_stay_tied():
    model, plain, handle = pair("llama", 0, 2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=0)
    handle.remove()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _add_layer_buffers(model):
    """Give every MLP a buffer that scales its output, so a wrong buffer changes the logits."""
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_buffer("gain", torch.full((64,), 1.0 + 0.1 * i))
        layer.mlp.register_forward_hook(lambda mod, args, out: out * mod.gain)


def test_layers_with_buffers():
    model = make("llama")
    _add_layer_buffers(model)
    plain = copy.deepcopy(model)
    offload_layers(model, "cpu", resident_layers=1, ring=2, progress=False)
    assert model.model.layers[2].mlp.gain.is_meta  # streamed: only bound while the layer runs
    for a, b in zip(run_steps(model, IDS), run_steps(plain, IDS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_only_the_running_layer_is_bound():
    model, _, handle = pair("llama", 1, 3)
    layers = model.model.layers
    seen = []

    def check(i):
        def hook(module, args):  # runs after the streamer's pre-hook has bound layer i
            bound = [not layers[j].mlp.up_proj.weight.is_meta for j in range(1, 4)]
            seen.append((i, bound))
        return hook

    for i in range(1, 4):
        layers[i].register_forward_pre_hook(check(i))
    with torch.no_grad():
        model(IDS)
    assert seen == [(1, [True, False, False]), (2, [False, True, False]), (3, [False, False, True])]
    assert all(layers[j].self_attn.q_proj.weight.is_meta for j in range(1, 4))


def test_interrupted_pass_recovers():
    model, plain, handle = pair("llama", 0, 2)
    boom = {"left": 1}

    def fail(module, args):
        if boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("boom")

    h = model.model.layers[2].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(IDS)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=0)


class _FakeEvent:
    """Host-synchronous stand-in for torch.cuda.Event (work 'completes' when recorded)."""

    def __init__(self, enable_timing=False):
        self.t, self.timing = None, enable_timing

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        assert self.t is not None, "synchronize on an event never recorded"

    def elapsed_time(self, other):
        assert self.timing and other.timing, "elapsed_time needs enable_timing=True on both events"
        return (other.t - self.t) * 1e3


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        assert event.t is not None, "waiting on an event never recorded"

    def synchronize(self):
        pass


def test_cuda_transport_logic_on_fake_cuda(monkeypatch):
    """The CUDA transport's event/stream bookkeeping, run on CPU tensors with synchronous fakes."""
    import contextlib

    from edgespec.offload import api, transport

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: time.sleep(cycles / 1e9), raising=False)
    monkeypatch.setattr(api, "make_transport", lambda device, delay: transport.CudaTransport(device, delay))
    for quantize, ring in [(None, 1), (None, 3), ("int8", 2), ("nf4", 2)]:
        model, plain, handle = pair("llama", 1, ring, quantize=quantize, link_delay=0.001)
        assert isinstance(handle.transport, transport.CudaTransport)
        steps = run_steps(model, IDS)
        if quantize is None:
            for a, b in zip(steps, run_steps(plain, IDS)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert handle.last_pass.bytes == handle.pinned_bytes and handle.last_pass.transfer_time > 0
        handle.remove()


@pytest.mark.parametrize("resident,count,quantize", [(4, 1, None), (4, 4, None), (2, 1, None), (3, 2, "int8")])
def test_demote_keeps_logits(resident, count, quantize):
    """The out-of-memory back-off streams resident layers from then on; outputs do not change,
    also in the middle of a cached sequence."""
    model, plain, handle = pair("llama", resident, 2, quantize=quantize)
    cache, ref_cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        model(IDS[:, :6], use_cache=True, **kv(cache))
        ref = plain(IDS[:, :6], use_cache=True, **kv(ref_cache))
        assert handle.demote(count) == count
        assert handle.resident_layers == resident - count and handle.streamed_layers == 4 - resident + count
        assert 1 <= handle.ring <= 2  # the ring never grows in a back-off (it may stay clamped)
        got = model(IDS[:, 6:9], use_cache=True, **kv(cache)).logits
        ref = plain(IDS[:, 6:9], use_cache=True, **kv(ref_cache)).logits
    tol = 0.05 if quantize else 1e-5
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    left = handle.resident_layers
    assert handle.demote(10) == left and handle.resident_layers == 0 and handle.demote(1) == 0
    with torch.no_grad():
        got = model(IDS[:, 9:12], use_cache=True, **kv(cache)).logits
        ref = plain(IDS[:, 9:12], use_cache=True, **kv(ref_cache)).logits
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


# ---- 2. generate ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("resident", [0, 2, 4])
def test_generate_matches(arch, resident):
    model, plain, _ = pair(arch, resident, 2)
    prompt = IDS[:, :5]
    out = model.generate(prompt, do_sample=False, max_new_tokens=20)
    ref = plain.generate(prompt, do_sample=False, max_new_tokens=20)
    assert out.tolist() == ref.tolist()


# ---- 3. overlap and stats -------------------------------------------------------------------
def test_transfers_overlap_compute():
    """8 streamed layers, 20 ms emulated link per layer, ~20 ms compute per layer: a pass must take
    about max(compute, transfer), clearly less than their sum."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    handle = offload_layers(model, "cpu", resident_layers=0, ring=2, link_delay=0.02, progress=False)
    ids = torch.randint(0, 128, (1, 256))
    with torch.no_grad():
        model(ids)  # warm-up
        handle.reset_stats()
        for _ in range(3):
            model(ids)
    passes = list(handle.stats.passes)
    assert len(passes) == 3 and handle.stats.total.passes == 3
    for p in passes:
        assert p.layers == 8
        assert p.bytes == handle.pinned_bytes == 8 * handle.layer_bytes
        assert p.transfer_time >= 8 * 0.02 * 0.95
    best = min(passes, key=lambda p: p.wall_time / (p.compute_time + p.transfer_time))
    assert best.wall_time < 0.9 * (best.compute_time + best.transfer_time)
    assert best.overlap > 0.2
    assert handle.stats.total.bytes == 3 * handle.pinned_bytes


def test_stats_and_sizes():
    model, _, handle = pair("llama", 1, 2)
    assert handle.streamed_layers == 3 and handle.ring == 2
    assert handle.slot_bytes >= handle.layer_bytes > 0
    assert handle.last_pass is None
    with torch.no_grad():
        model(IDS)
    last = handle.last_pass
    assert last.passes == 1 and last.layers == 3 and last.bytes == handle.pinned_bytes
    assert last.wall_time > 0 and last.compute_time > 0 and 0 <= last.overlap <= 1
    assert set(last.as_dict()) >= {"bytes", "transfer_time", "compute_time", "wait_time", "wall_time", "overlap"}
    handle.reset_stats()
    assert handle.stats.total.passes == 0 and handle.last_pass is None


# ---- 4. quantized streaming -----------------------------------------------------------------
# Measured on these tiny random models (fp32, 4 layers all streamed): int8 max |Δlogit| ≈ 1.1 % of
# max |logit|, nf4 ≈ 21 % (cosine similarity of the logits > 0.97); weight-level relative error
# ≈ 0.8 % (int8) and ≈ 9 % (nf4).
@pytest.mark.parametrize("quantize,tol,ratio", [("int8", 0.03, 3.5), ("nf4", 0.4, 6.0)])
def test_quantized_streaming(quantize, tol, ratio):
    model, plain, handle = pair("llama", 0, 2, quantize=quantize)
    full = offload_layers(copy.deepcopy(plain), "cpu", resident_layers=0, progress=False)
    with torch.no_grad():
        a, b = model(IDS).logits, plain(IDS).logits
    assert (a - b).abs().max() <= tol * b.abs().max()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97
    assert handle.last_pass.bytes == handle.pinned_bytes
    assert full.pinned_bytes / handle.pinned_bytes > ratio  # fewer bytes cross the link


def test_nf4_decode_does_not_depend_on_its_step(monkeypatch):
    """The decode runs in steps of whole blocks (bigger on a GPU): any step gives the same weights."""
    from edgespec.offload.codecs import NF4Blocks

    codec, w = NF4Blocks(), torch.randn(320, 192, generator=torch.Generator().manual_seed(0))
    region = torch.empty(codec.nbytes(w.shape), dtype=torch.uint8)
    codec.encode_into(w, region)
    outs = []
    for step in (1 << 14, 7, 1):
        monkeypatch.setattr(codec, "chunk_blocks", {"cpu": step})
        outs.append(torch.empty_like(w))
        codec.decode_into(region, outs[-1])
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert 0.05 < float((outs[0] - w).norm() / w.norm()) < 0.12  # nf4's ≈ 9 % weight error


def test_remove_restores_a_host_model():
    model, plain, handle = pair("llama", 2, 2)
    with torch.no_grad():
        model(IDS)
    assert handle.remove() is model and handle.remove() is model  # idempotent
    assert find_handle(model) is None
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=0)
    offload_layers(model, "cpu", resident_layers=0, progress=False)  # can offload again
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=0)


# ---- 5. errors ------------------------------------------------------------------------------
class _NoDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _NoLayers(_NoDecoder):
    def get_decoder(self):
        return self.proj


@pytest.mark.parametrize("model", [_NoDecoder(), _NoLayers()])
def test_unsupported_model(model):
    with pytest.raises(UnsupportedModelError, match=type(model).__name__):
        offload_layers(model, "cpu", progress=False)


@pytest.mark.parametrize("kw", [{"ring": 0}, {"quantize": "fp8"}, {"link_delay": -1.0}, {"resident_layers": -1},
                                {"device": "cuda:0"} if not torch.cuda.is_available() else {"ring": -2}])
def test_invalid_arguments(kw):
    kw = {"device": "cpu", **kw}
    with pytest.raises(InvalidArgumentError):
        offload_layers(make(), progress=False, **kw)


def test_offloading_twice_is_an_error():
    model, _, _ = pair("llama")
    with pytest.raises(InvalidArgumentError, match="already offloaded"):
        offload_layers(model, "cpu", progress=False)


# ---- profiling script -----------------------------------------------------------------------
def test_profile_script_smoke(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_offload.py"
    spec = importlib.util.spec_from_file_location("profile_offload", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    result = mod.main(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--tree-sizes", "1,16",
                       "--repeats", "1", "--prefix", "16", "--json", str(out)])
    assert [r["tokens"] for r in result["rows"]] == [1, 16]
    assert all(r["streamed_mb"] > 0 and r["pass_ms"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["shape"] == "tiny"
    assert "not meaningful" in capsys.readouterr().out


def kv(cache) -> dict:
    """The cache keyword of this transformers version (`cache` or `past_key_values`)."""
    return {cache_kwarg(LlamaForCausalLM): cache}


def test_copy_workers_stop_with_their_transport_and_at_exit():
    """A copy worker that outlives its transport, or the interpreter's shutdown, would free tensors while
    the interpreter finalizes and abort the process: collected transports stop theirs at once, and the
    exit hook joins the rest."""
    import gc

    from edgespec.offload import transport

    t = transport.ThreadTransport()
    worker = t._entry[0]
    del t
    gc.collect()
    assert not worker.is_alive()
    live = transport.ThreadTransport()
    assert live._entry in transport._WORKERS
    transport._stop_workers()
    assert not live._entry[0].is_alive() and live._entry not in transport._WORKERS
