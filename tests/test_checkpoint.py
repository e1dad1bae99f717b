"""Loading an offloaded target layer by layer (edgespec/loading/loader.py): the same model as
loading it whole, with never more than one decoder layer's weights on the host outside the packs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgespec.offload import find_handle
from edgespec.base.errors import ModelNotFoundError
from edgespec.loading.models import load_model
from edgespec.offload import offload_layers
from edgespec.loading.loader import load_offloaded
from edgespec.offload.layout import LayerPack
from tests.conftest import tiny_model

CPU = torch.device("cpu")
IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))


def save(tmp_path, arch="llama", shard=None, **extra):
    """A tiny checkpoint folder; `shard` (e.g. "40KB") splits it into several files with an index."""
    folder = tmp_path / arch
    kw = {"max_shard_size": shard} if shard else {}
    tiny_model(arch, 0, vocab=96, layers=4, hidden=64, **extra).save_pretrained(folder, **kw)
    return folder


def whole(folder, **kw):
    model = load_model(str(folder), dtype=torch.float32, progress=False)
    offload_layers(model, CPU, progress=False, **kw)
    return model


def outputs(model):
    with torch.no_grad():
        return model(IDS).logits, model.generate(IDS, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("arch,extra", [("llama", {"shard": "40KB"}), ("qwen2", {"tie_word_embeddings": True})])
@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
@pytest.mark.parametrize("resident", [0, 2])
def test_layerwise_equals_whole(tmp_path, arch, extra, quantize, resident):
    folder = save(tmp_path, arch, **extra)
    if "shard" in extra:
        assert (folder / "model.safetensors.index.json").is_file()
    kw = dict(resident_layers=resident, quantize=quantize)
    fast = load_offloaded(str(folder), CPU, torch.float32, progress=False, **kw)
    ref = whole(folder, **kw)
    (la, ga), (lb, gb) = outputs(fast), outputs(ref)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert fast.config.num_hidden_layers == 4 and len(fast.model.layers) == 4
    assert find_handle(fast).resident_layers == resident
    tied = fast.lm_head.weight is fast.model.embed_tokens.weight
    assert tied == bool(extra.get("tie_word_embeddings"))


def test_one_layer_on_the_host_at_a_time(tmp_path, monkeypatch):
    """When layer i is packed, the layers after it are not read yet and the ones before it are released."""
    folder = save(tmp_path, "llama", shard="40KB")
    import edgespec.offload.api as api

    seen, layers, pack, offload = [], [], LayerPack.pack, api.offload_layers

    def spy_offload(model, *a, **kw):
        layers.extend(model.model.layers)
        return offload(model, *a, **kw)

    def spy_pack(index, layer, codec=None, pin=False, encoded=None):
        seen.append((index, [i for i, lay in enumerate(layers) if any(not p.is_meta for p in lay.parameters())]))
        return pack(index, layer, codec, pin, encoded)

    monkeypatch.setattr(api, "offload_layers", spy_offload)
    monkeypatch.setattr(LayerPack, "pack", staticmethod(spy_pack))
    model = load_offloaded(str(folder), CPU, torch.float32, progress=False, resident_layers=1)
    assert seen == [(1, [0, 1]), (2, [0, 2]), (3, [0, 3])]  # layer 0 is resident; one streamed layer at a time
    assert all(p.is_meta for p in model.model.layers[3].parameters())  # packed, unbound


def test_falls_back_to_a_whole_load_and_says_why(tmp_path, capsys):
    """A checkpoint without safetensors (a PyTorch .bin) still loads, whole, with a note."""
    src = save(tmp_path, "llama")
    folder = tmp_path / "bin"
    folder.mkdir()
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((src / "config.json").read_text())
    fast = load_offloaded(str(folder), CPU, torch.float32, progress=True)
    assert "loading the target whole before streaming it (no safetensors checkpoint)" in capsys.readouterr().err
    (la, ga), (lb, gb) = outputs(fast), outputs(whole(src))
    assert torch.equal(la, lb) and torch.equal(ga, gb)


def test_renamed_layer_weights_fall_back(tmp_path, capsys):
    """Names transformers would have to convert are left to transformers (the whole-model load)."""
    folder = save(tmp_path, "llama")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight_renamed"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    load_offloaded(str(folder), CPU, torch.float32, progress=True)  # transformers re-initialises the weight
    assert "names its layer weights differently (no model.layers.0.mlp.up_proj.weight)" in capsys.readouterr().err


def test_missing_shard_names_the_file(tmp_path):
    folder = save(tmp_path, "llama", shard="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (folder / shard).unlink()
    with pytest.raises(ModelNotFoundError, match=f"lists the shard {shard}, which is missing"):
        load_offloaded(str(folder), CPU, torch.float32, progress=False)


def test_damaged_shard_names_the_file(tmp_path):
    folder = save(tmp_path, "llama", shard="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.3.self_attn.q_proj.weight"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match=f"Could not read {shard}.*damaged: download it again"):
        load_offloaded(str(folder), CPU, torch.float32, progress=False)


@pytest.fixture(scope="module")
def gguf_copies(tmp_path_factory):
    """The embedded SmolLM2 Q4_1 GGUF (Llama: q/k un-permuted) converted three ways, each in its own
    cache: edgespec's per-layer conversion in fp32 and bf16 (the tokenizer converted alone first), and
    transformers' whole-model conversion, reached through the fallback for unsupported architectures."""
    import contextlib
    import io

    import edgespec.loading.convert as convert
    from edgespec.loading.models import embedded_gguf, load_tokenizer, local_folder

    gguf, ours, theirs = str(embedded_gguf()), tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESPEC_CACHE", str(ours))
        out["tokenizer"] = load_tokenizer(gguf, progress=False)
        out["after_tokenizer"] = sorted(p.name for p in ours.glob("*/*"))
        out["fp32"], out["bf16"] = local_folder(gguf, False), local_folder(gguf, False, torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(io.StringIO()) as said:
        mp.setenv("EDGESPEC_CACHE", str(theirs))
        mp.setattr(convert, "convert_gguf", _unsupported)
        out["whole"] = local_folder(gguf, progress=True)
    out["said"] = said.getvalue()
    return out


def _unsupported(*a, **kw):
    from edgespec.loading.convert import Unsupported

    raise Unsupported("GGUF architecture test needs transformers' whole-file conversion")


@pytest.mark.slow
def test_gguf_converted_layer_by_layer_equals_transformers_whole_conversion(gguf_copies):
    """Bit for bit: weights, config, generation config, tokenizer."""
    from edgespec.loading.models import load_tokenizer

    ours, theirs = Path(gguf_copies["fp32"]), Path(gguf_copies["whole"])
    assert len(list(ours.glob("model-*.safetensors"))) == 31  # outside + one shard per decoder layer
    a, b = load_model(str(ours), progress=False), load_model(str(theirs), progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = a.config.to_dict(), b.config.to_dict()
    assert ca.pop("_name_or_path") != cb.pop("_name_or_path") and ca == cb
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    ta, tb = load_tokenizer(str(ours), False), load_tokenizer(str(theirs), False)
    assert ta.get_vocab() == tb.get_vocab() and ta.chat_template == tb.chat_template


@pytest.mark.slow
def test_gguf_conversion_falls_back_to_transformers(gguf_copies):
    """An architecture the per-layer converter does not handle is converted whole, with a note."""
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf whole (GGUF architecture test" in gguf_copies["said"]
    assert (Path(gguf_copies["whole"]) / "model.safetensors").is_file()


@pytest.mark.slow
def test_gguf_cache_per_dtype_and_tokenizer_alone(gguf_copies):
    """A GPU's bf16 copy is the fp32 copy cast to bf16 (so the same model on load, at half the disk);
    the tokenizer is converted alone, without de-quantizing any weight."""
    from edgespec.loading.models import load_tokenizer

    files = gguf_copies["after_tokenizer"]
    assert files and not any(n.endswith(".safetensors") for n in files)
    fp32, bf16 = gguf_copies["fp32"], gguf_copies["bf16"]
    assert bf16 == fp32 + "-bfloat16"
    a = load_model(fp32, dtype=torch.bfloat16, progress=False).state_dict()
    b = load_model(bf16, dtype=torch.bfloat16, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    size = lambda f: sum(p.stat().st_size for p in Path(f).glob("*.safetensors"))  # noqa: E731
    assert size(bf16) < 0.51 * size(fp32)
    tok, whole = gguf_copies["tokenizer"], load_tokenizer(fp32, progress=False)
    assert tok.get_vocab() == whole.get_vocab() and tok.chat_template == whole.chat_template
    text = "Hello, world! <|im_start|>user ünïcödé 123"
    assert tok(text)["input_ids"] == whole(text)["input_ids"]


def test_an_architecture_that_needs_its_layers_loads_whole(tmp_path, monkeypatch, capsys):
    """If transformers refuses the zero-layer copy (per-layer config lists it validates, say), the
    target loads whole, with a note, instead of failing."""
    from transformers import AutoModelForCausalLM

    folder = save(tmp_path, "llama")
    real = AutoModelForCausalLM.from_pretrained.__func__

    def picky(cls, *a, config=None, **kw):
        if config is not None and config.num_hidden_layers == 0:
            raise ValueError("layer_types must have num_hidden_layers entries")
        return real(cls, *a, **({"config": config} if config is not None else {}), **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(picky))
    fast = load_offloaded(str(folder), CPU, torch.float32, progress=True)
    assert "loading the target whole before streaming it (transformers cannot load it without its layers: " \
           "ValueError: layer_types" in capsys.readouterr().err
    (la, ga), (lb, gb) = outputs(fast), outputs(whole(folder))
    assert torch.equal(la, lb) and torch.equal(ga, gb)
