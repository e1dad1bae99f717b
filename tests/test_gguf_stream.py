"""An offloaded GGUF target streams its layers as the file's blocks, decoded on the device after each
copy (edgespec/loading/loader.py): the same model as its de-quantized copy, token for token, with 0, some and
all layers resident, and no de-quantized copy written. Tiny Llama and Qwen2 GGUFs of mixed types
(Q8_0, Q4_0, Q5_1 from gguf.quants.quantize, F32 norms) are written here with gguf.GGUFWriter; the
embedded default (Q4_1) is checked too (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from edgespec.offload import find_handle
from edgespec import Engine
from edgespec.loading.loader import load_offloaded
from edgespec.loading.models import load_model
from edgespec.base.stats import Plan
from tests.conftest import greedy_reference, noisy_copy
from tests.test_greedy import Fixed

CPU = torch.device("cpu")
V, H, FF, L, NH, KV = 96, 64, 96, 3, 4, 2  # FF = 3 blocks of 32: 96 rows, not a power of two
KINDS = {"attn_q": "Q8_0", "attn_k": "Q5_1", "attn_v": "Q4_0", "attn_output": "Q5_1", "ffn_gate": "Q4_0",
         "ffn_up": "Q8_0", "ffn_down": "Q5_1"}


def write_gguf(path, arch: str, seed: int = 0) -> None:
    """A tiny random `arch` ("llama": untied head; "qwen2": tied, q/k/v biases) with its tokenizer."""
    rng, w = np.random.default_rng(seed), GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(256), w.add_embedding_length(H), w.add_block_count(L), w.add_feed_forward_length(FF)
    w.add_head_count(NH), w.add_head_count_kv(KV), w.add_rope_dimension_count(H // NH)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0), w.add_vocab_size(V)
    tokens = [chr(0x41 + i) if i < 26 else chr(0x61 + i - 26) if i < 52 else f"<t{i}>" for i in range(V)]
    tokens[52] = "AB"
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_types([1] * V)
    w.add_token_merges(["A B"]), w.add_bos_token_id(0), w.add_eos_token_id(1)

    def tensor(name, shape, kind="F32", scale=0.15, one=False):
        x = (rng.standard_normal(shape) * scale + (1.0 if one else 0.0)).astype(np.float32)
        if kind == "F32":
            return w.add_tensor(name, x)
        q = quantize(x, Q[kind])
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q[kind])

    tensor("token_embd.weight", (V, H), "Q8_0", scale=1.0)
    tensor("output_norm.weight", (H,), one=True)
    if arch == "llama":
        tensor("output.weight", (V, H), "Q4_0")
    shapes = {"attn_q": (H, H), "attn_k": (KV * H // NH, H), "attn_v": (KV * H // NH, H), "attn_output": (H, H),
              "ffn_gate": (FF, H), "ffn_up": (FF, H), "ffn_down": (H, FF)}
    for i in range(L):
        tensor(f"blk.{i}.attn_norm.weight", (H,), one=True)
        tensor(f"blk.{i}.ffn_norm.weight", (H,), one=True)
        for part, kind in KINDS.items():
            tensor(f"blk.{i}.{part}.weight", shapes[part], kind)
            if arch == "qwen2" and part in ("attn_q", "attn_k", "attn_v"):
                tensor(f"blk.{i}.{part}.bias", (shapes[part][0],), scale=0.05)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    """(GGUF path, cache folder, whether the raw load wrote any safetensors, the raw-streamed model
    with 1 resident layer), with the cache to itself."""
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / f"tiny-{request.param}.gguf"
    write_gguf(path, request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESPEC_CACHE", str(folder / "cache"))
        raw = load_offloaded(str(path), CPU, torch.float32, progress=False, resident_layers=1)
        wrote = sorted(p.name for p in (folder / "cache").rglob("*.safetensors"))
        yield path, wrote, raw


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(2, V, (6 + 3 * k,), generator=gen).tolist() for k in range(n)]


def test_streams_raw_and_writes_no_dequantized_copy(tiny_gguf):
    path, wrote, raw = tiny_gguf
    assert wrote == [], "an offloaded GGUF target must not write a de-quantized copy"
    handle = find_handle(raw)
    kinds = {c["type"]: c["codec"] for c in handle.codecs()}
    assert kinds == {"Q8_0": "gguf:Q8_0", "Q4_0": "gguf:Q4_0", "Q5_1": "gguf:Q5_1", "F32": "gguf:F32"}
    from edgespec.loading.convert import gguf_index
    from edgespec.loading.skeleton import gguf_model

    _, _, source = gguf_model(path, gguf_index(str(path.parent), path.name), torch.float32)
    in_file = sum(source.tensors[f"model.layers.{i}.{k}"].nbytes for i in (1, 2)
                  for k in raw.model.layers[0].state_dict())
    tensors = sum(c["tensors"] for c in handle.codecs())
    assert in_file <= handle.pinned_bytes <= in_file + 128 * tensors  # the file's bytes, plus alignment


@pytest.mark.parametrize("resident", [0, 1, L])
def test_raw_stream_equals_the_dequantized_copy(tiny_gguf, resident, monkeypatch):
    """Logits bit for bit and greedy tokens: raw streaming, the de-quantized copy streamed, and the
    de-quantized model's own generate; the engine over the raw-streamed target gives the same tokens."""
    path, _, _ = tiny_gguf
    monkeypatch.setenv("EDGESPEC_CACHE", str(path.parent / "cache"))
    raw = load_offloaded(str(path), CPU, torch.float32, progress=False, resident_layers=resident)
    copy = load_offloaded(str(path), CPU, torch.float32, progress=False, resident_layers=resident, gguf_copy=True)
    whole = load_model(str(path), progress=False)
    assert find_handle(raw).streamed_layers == L - resident
    ids = torch.tensor([prompts(1)[0]])
    with torch.no_grad():
        a, b, c = raw(ids).logits, copy(ids).logits, whole(ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    engine = Engine(raw, noisy_copy(whole, 0.3), scheduler=Fixed(Plan(8, 4, 4, 8)), calibrate=False)
    for p in prompts(2):
        expected = greedy_reference(whole, p, 12)
        assert greedy_reference(raw, p, 12) == greedy_reference(copy, p, 12) == expected
        assert engine.generate(p, max_new_tokens=12, temperature=0).ids == expected


def test_llama_q_k_rows_are_permuted_once_on_the_host(tiny_gguf):
    """transformers un-permutes llama.cpp's q/k rows when it reads a GGUF (an internal processor this
    relies on): the raw bytes handed to the streamer carry that row order, for whole rows of blocks."""
    path, _, raw = tiny_gguf
    from edgespec.loading.convert import gguf_index
    from edgespec.offload.gguf_blocks import decode_into
    from edgespec.loading.skeleton import gguf_model

    _, _, source = gguf_model(path, gguf_index(str(path.parent), path.name), torch.float32)
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        blocks = source.raw(name)
        region = torch.empty(blocks.nbytes, dtype=torch.uint8)
        blocks.write(region)
        ref = source.read({name: torch.float32})[name]
        got = torch.empty_like(ref)
        decode_into(region, blocks.kind, got)
        assert torch.equal(got, ref)
        info = source.tensors[name]
        unpermuted = torch.empty_like(ref)
        decode_into(torch.from_numpy(source._file.array(info).copy()).reshape(-1), info.kind, unpermuted)
        assert torch.equal(unpermuted, ref) == (path.stem.endswith("qwen2")), "llama rows must move, qwen2's not"


def test_an_iquant_layer_is_refused_before_loading(tmp_path, monkeypatch):
    """A layer tensor of a type the device cannot decode: an error naming tensor, type and fix."""
    from edgespec.base.errors import UnsupportedModelError
    from edgespec.offload import gguf_blocks

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama")
    monkeypatch.delitem(gguf_blocks.TYPES, "Q5_1")  # as if Q5_1 were an I-quant
    with pytest.raises(UnsupportedModelError, match=r"tensor blk\.0\.attn_k\.weight \(model\.layers\.0\.self_attn"
                                                    r"\.k_proj\.weight\) is Q5_1.*--stream-quant int8"):
        load_offloaded(str(path), CPU, torch.float32, progress=False, resident_layers=0)
    model = load_offloaded(str(path), CPU, torch.float32, progress=False, resident_layers=0, quantize="int8")
    assert {c["codec"] for c in find_handle(model).codecs()} == {"int8", "copy"}


def test_generate_json_reports_the_stream(tiny_gguf, monkeypatch, capsys):
    """`generate --json`: bytes per pass, the codec of each tensor type, decode time per pass."""
    import json

    from edgespec.front import cli
    from edgespec.loading.models import load_tokenizer

    path, _, raw = tiny_gguf
    monkeypatch.setenv("EDGESPEC_CACHE", str(path.parent / "cache"))
    engine = Engine(raw, noisy_copy(load_model(str(path), progress=False), 0.3), load_tokenizer(str(path), False),
                    budget=4, calibrate=False)
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    assert cli.main(["generate", "AB ab", "--raw", "--json", "--max-new-tokens", "4"]) == 0
    off = json.loads(capsys.readouterr().out)["offload"]
    assert off["bytes_per_pass"] == find_handle(raw).pinned_bytes == off["last"]["bytes"]
    assert {c["type"] for c in off["codecs"]} == {"Q8_0", "Q4_0", "Q5_1", "F32"}
    assert 0 < off["last"]["decode_time"] <= off["last"]["transfer_time"]


@pytest.mark.slow
@pytest.mark.parametrize("resident", [0, 12, 30])
def test_embedded_default_streams_its_q4_1_blocks_raw(real_pair, resident):
    """The embedded SmolLM2 (Q4_1): raw streaming gives the de-quantized model's greedy tokens, as the
    de-quantized copy streamed does; the engine over it too."""
    target, drafter, tok = real_pair
    raw = load_offloaded(None, CPU, torch.float32, progress=False, resident_layers=resident)
    handle = find_handle(raw)
    assert handle.streamed_layers == 30 - resident
    if resident < 30:
        assert {c["type"] for c in handle.codecs()} == {"Q4_1", "F32"}
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a large river."}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    expected = greedy_reference(target, ids, 8)
    assert greedy_reference(raw, ids, 8) == expected
    if resident == 12:
        copy = load_offloaded(None, CPU, torch.float32, progress=False, resident_layers=resident, gguf_copy=True)
        assert greedy_reference(copy, ids, 8) == expected
        engine = Engine(raw, drafter, tok, budget=8, calibrate=False)
        assert engine.generate(ids, max_new_tokens=8, temperature=0).ids == expected


def test_profile_script_compares_both_ways(tiny_gguf, tmp_path, monkeypatch, capsys):
    """scripts/profile_gguf_stream.py, its per-process measurement run in this process on a tiny GGUF."""
    from tests.test_scripts import load

    path, _, _ = tiny_gguf
    monkeypatch.setenv("EDGESPEC_CACHE", str(path.parent / "cache"))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"turns": ["AB ab BA"]}\n{"turns": ["ba AB"]}\n')
    script = load("profile_gguf_stream")
    args = script.parse_args(["--gguf", str(path), "--sizes", "1,4", "--repeats", "1", "--prompts", "2",
                              "--tokens", "5", "--questions", str(questions), "--device", "cpu"])
    script.prepare(str(path), args)
    rows = [script.child(str(path), way, args) for way in ("raw", "copy")]
    raw, copy = rows
    assert raw["tokens"] == copy["tokens"] and len(raw["tokens"]) == 2 and len(raw["tokens"][0]) == 5
    assert raw["streamed_gb"] < 0.5 * copy["streamed_gb"]
    assert all(p["decode_s"] > 0 for p in raw["passes"]) and all(p["decode_s"] == 0 for p in copy["passes"])
    text = script.table(rows)
    assert "| raw |" in text and text.rstrip().endswith("reference |") and "| yes |" in text
