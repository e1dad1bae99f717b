"""The target drafts for itself (edgespec/loading/self_drafter.py): greedy output equal to the target's own `generate`
for Llama, Qwen2 and two sliding-window families (Mistral: lean forward; Gemma 2: transformers' forward,
eager attention) with 0, some and all layers resident; the drafter holds the target's very tensors for
its resident layers (storage pointers) and low-bit copies only for the streamed ones; copies saved and read
back; HF assisted generation takes it as its assistant; the memory plan (edgespec/loading/memory_plan.py)."""
from __future__ import annotations

import pytest
import torch

from edgespec import Engine
from edgespec.loading import lowbit, memory_plan as pairplan, self_drafter as selfdraft
from edgespec.base.errors import InvalidArgumentError, OutOfMemoryError
from edgespec.offload import offload_layers
from edgespec.base.stats import Plan
from tests.conftest import Fixed, greedy_reference, tiny_model, tiny_tokenizer

W = 8  # sliding window of the sliding families
LAYERS = 3
NEW = 3 * W + 6  # past three windows
FAMILIES = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": W}, "gemma2": {"sliding_window": W}}
PROMPTS = [[3, 14, 15, 9, 26], [53, 58, 9, 7, 9]]


def target_model(family: str, **kw):
    return tiny_model(family, layers=LAYERS, hidden=64, **{"init": 0.1, **FAMILIES[family], **kw})


def storages(module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if not t.is_meta}


def self_pair(family: str, resident: int, codec: str = "nf4", **kw):
    target = target_model(family, **kw)
    refs = [greedy_reference(target, ids, NEW) for ids in PROMPTS]
    handle = offload_layers(target, "cpu", resident_layers=resident, progress=False)
    return target, handle, selfdraft.build(target, handle, codec, progress=False), refs


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("resident", [0, 1, LAYERS])
def test_greedy_matches_generate(family, resident):
    target, handle, sd, refs = self_pair(family, resident)
    assert sd.shared == list(range(resident)) and sd.copies == list(range(resident, LAYERS))
    engine = Engine(target, sd.model, scheduler=Fixed(Plan(8, 12, 4, 16)), overlap=resident % 2 == 1,
                    self_draft=sd)
    steps = []
    for ids, want in zip(PROMPTS, refs):
        out = engine.generate(ids, max_new_tokens=NEW)
        assert out.ids == want
        steps += out.stats.steps
    assert max(s.accepted for s in steps) > 2, "no tree path was ever accepted: the drafter went unused"
    assert handle.stats.total.passes > 0  # the target really streamed


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_resident_layers_are_the_targets_own_tensors(family):
    target, handle, sd, _ = self_pair(family, 2)
    mine, theirs = sd.model.get_decoder().layers, target.get_decoder().layers
    for i in (0, 1):  # resident: every tensor is the target's (same storage), no module is
        assert mine[i] is not theirs[i]
        for (name, a), (_, b) in zip(mine[i].state_dict(keep_vars=True).items(),
                                     theirs[i].state_dict(keep_vars=True).items()):
            assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), name
    assert sd.model.get_input_embeddings().weight is target.get_input_embeddings().weight
    assert sd.model.get_output_embeddings().weight is target.get_output_embeddings().weight
    assert sd.model.get_decoder().norm.weight is target.get_decoder().norm.weight
    # everything the drafter holds beyond the target's tensors is layer 2's low-bit copy, and no more
    own = storages(sd.model) - storages(target)
    assert own == storages(mine[2]) - storages(target)
    assert all(lowbit.is_copy(m) for m in mine[2].modules() if isinstance(m, torch.nn.Linear))
    dense = sum(p.numel() * p.element_size() for p in target_model(family).get_decoder().layers[2].parameters())
    assert 0 < sd.copy_bytes < dense / 4 and sd.copy_bytes == selfdraft.own_bytes(mine[2])
    # the drafter's layers carry no streaming hooks: it never runs the target's layer modules
    assert not any(layer._forward_pre_hooks for layer in mine)


def test_all_resident_is_the_target_itself():
    target, _, sd, _ = self_pair("qwen2", LAYERS)
    assert storages(sd.model) <= storages(target) and sd.copy_bytes == 0
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(sd.model(ids).logits, target(ids).logits)


def test_hf_assisted_generation_takes_it_as_assistant():
    target, _, sd, refs = self_pair("llama", 1)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=sd.model,
                              max_new_tokens=NEW, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == refs[0]


def test_bench_runs_all_three_methods_with_it():
    from edgespec.front.bench import run_bench

    target = tiny_model("llama", layers=LAYERS, hidden=64, init=0.5)
    handle = offload_layers(target, "cpu", resident_layers=1, progress=False)
    sd = selfdraft.build(target, handle, "nf4", progress=False)
    engine = Engine(target, sd.model, tiny_tokenizer(), budget=8, self_draft=sd)
    result = run_bench(engine, ["the capital of france is", "hello world"], 8, progress=False)
    assert all(r["same_output"] for r in result["rows"]), result["rows"]
    assert {r["method"] for r in result["rows"]} == {"edgespec", "plain", "hf-assisted"}


def test_copies_are_saved_and_read_back(tmp_path, monkeypatch):
    target, handle, sd, refs = self_pair("qwen2", 1)
    first = selfdraft.build(target, handle, "nf4", cache=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer0001.safetensors", "layer0002.safetensors"]
    monkeypatch.setattr(lowbit, "quantize", lambda *a, **k: pytest.fail("quantized again instead of reading"))
    again = selfdraft.build(target, handle, "nf4", cache=tmp_path, progress=False)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, again.model(ids).logits)
        assert torch.equal(sd.model(ids).logits, again.model(ids).logits)
    assert again.copy_bytes == first.copy_bytes
    (tmp_path / "layer0002.safetensors").write_bytes(b"broken")  # a damaged file is made again, and replaced
    monkeypatch.undo()
    third = selfdraft.build(target, handle, "nf4", cache=tmp_path, progress=False)
    with torch.no_grad():
        assert torch.equal(third.model(ids).logits, first.model(ids).logits)
    assert (tmp_path / "layer0002.safetensors").stat().st_size > 100


@pytest.mark.parametrize("codec", ["int8", "hqq2", "hqq4"])
def test_other_codecs_stay_lossless(codec):
    pytest.importorskip("hqq") if codec.startswith("hqq") else None
    target, _, sd, refs = self_pair("llama", 1, codec)
    assert all(lowbit.is_copy(m) for m in sd.model.get_decoder().layers[2].modules()
               if isinstance(m, torch.nn.Linear))
    engine = Engine(target, sd.model, scheduler=Fixed(Plan(8, 12, 4, 16)))
    assert engine.generate(PROMPTS[0], max_new_tokens=NEW).ids == refs[0]


def test_a_demoted_layer_gets_its_copy():
    """The out-of-memory back-off streams a resident layer from then on: the drafter copies it (its
    tensors no longer the target's) and the output stays the target's."""
    target, handle, sd, refs = self_pair("qwen2", LAYERS)
    engine = Engine(target, sd.model, scheduler=Fixed(Plan(8, 12, 4, 16)), self_draft=sd)
    assert engine.generate(PROMPTS[0], max_new_tokens=NEW).ids == refs[0]
    assert handle.demote(1) == 1
    assert sd.shared == [0, 1] and sd.copies == [2] and sd.copy_bytes > 0
    layer = sd.model.get_decoder().layers[2]
    assert all(lowbit.is_copy(m) for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert not storages(layer) & storages(target)  # nothing of the (now streamed) layer is the target's
    engine.reset()
    assert engine.generate(PROMPTS[1], max_new_tokens=NEW).ids == refs[1]


def test_stats_show_the_layout():
    from tests.conftest import chat_session

    target = tiny_model("llama", layers=LAYERS, hidden=64, init=0.5)
    handle = offload_layers(target, "cpu", resident_layers=1, progress=False)
    sd = selfdraft.build(target, handle, "nf4", progress=False)
    engine = Engine(target, sd.model, tiny_tokenizer(), budget=4, self_draft=sd)
    session, out, _ = chat_session(engine)
    session.handle("hello world")
    text = session.stats_text()
    assert "self-drafter: 1 target layers shared (the same tensors), 2 nf4 copies" in text
    info = sd.describe()
    assert info["shared_layers"] == 1 and info["copied_layers"] == 2
    assert info["kv_shareable_bytes_per_token"] == 1 * 2 * 2 * 16 * 4  # 1 layer, K+V, 2 heads x 16, fp32


# ---- loading -------------------------------------------------------------------------------------
def test_load_pair_builds_it_from_a_gguf_target(tmp_path, monkeypatch):
    """From a GGUF streamed as its blocks: the copies are made from the decoded blocks (no de-quantized
    copy written), saved, and read back by the next load."""
    from edgespec.base.config import LoadConfig
    from edgespec.loading.loader import load_pair
    from edgespec.loading.models import load_model
    from tests.test_gguf_stream import prompts, write_gguf

    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, "qwen2")
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    config = LoadConfig(str(path), "self", device="cpu", resident_layers=1, progress=False)
    loaded = load_pair(config)
    assert loaded.self_draft is not None and loaded.self_draft.shared == [0]
    assert loaded.self_draft.plan.resident == 1 and loaded.self_draft.plan.codec == pairplan.ORDER[0]
    copies = sorted((tmp_path / "cache" / "selfdraft").rglob("layer*.safetensors"))
    assert len(copies) == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("tiny-qwen2-")
                and not p.name.endswith(("-index", "-tokenizer"))], "a de-quantized copy was written"
    reference = load_model(str(path), dtype=torch.float32, progress=False)
    ids = prompts(1)[0]
    want = greedy_reference(reference, ids, 20)
    engine = Engine(loaded.target, loaded.drafter, loaded.tokenizer, offload=loaded.offload,
                    self_draft=loaded.self_draft, scheduler=Fixed(Plan(8, 12, 4, 16)))
    assert engine.generate(ids, max_new_tokens=20).ids == want
    monkeypatch.setattr(lowbit, "quantize", lambda *a, **k: pytest.fail("quantized again instead of reading"))
    assert load_pair(config).self_draft.copies == [1, 2]


def test_the_default_drafter_of_an_offloaded_target_is_itself(tmp_path, monkeypatch):
    from edgespec.base.config import LoadConfig
    from edgespec.loading.loader import load_pair

    folder = tmp_path / "tiny"
    tiny_model("llama", layers=LAYERS, hidden=64).save_pretrained(folder)
    tiny_tokenizer(64).save_pretrained(folder)
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    loaded = load_pair(LoadConfig(str(folder), device="cpu", progress=False))
    assert loaded.self_draft is not None and loaded.drafter is loaded.self_draft.model
    assert loaded.self_draft.shared == [] and loaded.self_draft.plan.given == ()  # a CPU streams every layer
    whole = load_pair(LoadConfig(str(folder), device="cpu", offload=False, progress=False))
    assert whole.self_draft is None  # not offloaded: the target's own nf4 copy drafts
    with pytest.raises(InvalidArgumentError, match="self-drafter"):
        load_pair(LoadConfig(str(folder), device="cpu", draft_quant="hqq2", offload=False, progress=False))
    with pytest.raises(InvalidArgumentError, match="low-bit"):
        load_pair(LoadConfig(str(folder), "self", device="cpu", draft_quant="none", progress=False))


def test_cli_draft_self_reaches_the_load_config(monkeypatch):
    from edgespec.front import cli

    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: seen.update(kw, args=a) or "e"))
    args = cli.build_parser().parse_args(["generate", "hi", "--draft", "self", "--draft-quant", "hqq3"])
    assert cli.make_engine(args) == "e"
    assert seen["args"][1] == "self" and seen["draft_quant"] == "hqq3"


# ---- the memory plan -----------------------------------------------------------------------------
MIB = 1 << 20
SIZES = pairplan.PairSizes(layers=32, layer=400 * MIB,
                           copy={"int8": 220 * MIB, "nf4": 115 * MIB, "hqq3": 90 * MIB, "hqq2": 64 * MIB},
                           outside=2000 * MIB, slot=800 * MIB, ring=2, reserve=1500 * MIB)


def fits(plan: pairplan.PairPlan, free: int) -> bool:
    return plan.used <= free


def test_plan_keeps_as_many_layers_resident_as_fit_with_the_first_codec_that_fits():
    free = 14 * 1024 * MIB
    plan = pairplan.plan_pair(SIZES, free, "cuda")
    assert plan.codec == "int8" and 0 < plan.resident < 32 and fits(plan, free)
    more = pairplan._used(SIZES, "int8", plan.resident + 1, "cuda") + SIZES.outside + SIZES.reserve
    assert more > free, "one more resident layer would still have fitted"


def test_plan_falls_to_fewer_bits_then_refuses():
    def least(codec):  # the free memory the codec's copies need with no layer resident
        return SIZES.outside + SIZES.reserve + SIZES.ring * SIZES.slot + 32 * SIZES.copy[codec]

    assert pairplan.plan_pair(SIZES, least("int8") - MIB, "cuda").codec == "nf4"
    plan = pairplan.plan_pair(SIZES, least("nf4") - MIB, "cuda")
    assert plan.codec == "hqq3" and fits(plan, least("nf4") - MIB)
    with pytest.raises(OutOfMemoryError, match="--resident-layers.*hqq2.*--draft"):
        pairplan.plan_pair(SIZES, SIZES.outside + SIZES.reserve, "cuda")


def test_plan_takes_what_is_given_and_fits_the_rest():
    free = 12 * 1024 * MIB
    plan = pairplan.plan_pair(SIZES, free, "cuda", codec="hqq2")
    assert plan.codec == "hqq2" and plan.resident > pairplan.plan_pair(SIZES, free, "cuda").resident
    assert plan.given == ("codec",)
    plan = pairplan.plan_pair(SIZES, free, "cuda", resident=12)  # int8 copies of the other 20 no longer fit
    assert (plan.resident, plan.codec, plan.given) == (12, "nf4", ("resident layers",))
    whole = pairplan.plan_pair(SIZES, 64 * 1024 * MIB, "cuda")
    assert (whole.resident, whole.codec) == (32, None)  # everything fits: no copies
    cpu = pairplan.plan_pair(SIZES, 64 * 1024 * MIB, "cpu")
    assert (cpu.resident, cpu.codec) == (0, "int8")  # a CPU streams every layer unless told
    assert "memory plan (automatic): 0 resident, int8 copies" in cpu.line()


def test_sizes_of_a_model_before_its_layers_are_placed():
    model = tiny_model("llama", layers=LAYERS, hidden=64)
    sizes = pairplan.sizes_of(model, torch.device("cuda"), kv_tokens=128, tree_tokens=16)
    dense = sum(p.numel() * 4 for p in model.get_decoder().layers[0].parameters())
    assert sizes.layers == LAYERS and sizes.layer == dense and sizes.outside > 0
    assert sizes.copy["hqq2"] < sizes.copy["nf4"] < sizes.copy["int8"] < dense
    kv = 2 * 128 * LAYERS * pairplan.kv_layer_bytes(model.config, torch.float32)
    assert sizes.reserve > kv


def test_who_drafts_by_default():
    from edgespec.base.config import LoadConfig
    from edgespec.loading.loader import _self_drafts

    assert _self_drafts(LoadConfig()) and _self_drafts(LoadConfig(drafter="self", offload=False))
    assert not _self_drafts(LoadConfig(offload=False))  # the whole target on the device: its own copy drafts
    assert not _self_drafts(LoadConfig(target_shape="llama-8b"))  # a padded benchmark target: the small copy
    assert not _self_drafts(LoadConfig(draft_quant="none"))  # an unquantized copy asked for
    assert not _self_drafts(LoadConfig(drafter="some/model"))


def test_profile_and_bench_report_the_layout(monkeypatch, tmp_path, capsys):
    import json

    from edgespec.front import cli

    target = tiny_model("llama", layers=LAYERS, hidden=64, init=0.5)
    handle = offload_layers(target, "cpu", resident_layers=1, progress=False)
    sd = selfdraft.build(target, handle, "nf4", progress=False)
    engine = Engine(target, sd.model, tiny_tokenizer(), budget=8, self_draft=sd)
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    argv = ["profile", "--out-dir", str(tmp_path), "--sizes", "1,4", "--budgets", "2", "--prompts", "1",
            "--max-new-tokens", "4", "--prefix", "8"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "profile.json").read_text())
    assert r["model"]["self_draft"]["shared_layers"] == 1 and r["memory"]["drafter_weight_bytes"] == sd.copy_bytes
    assert "self-drafter: 1 target layers shared" in capsys.readouterr().out
    assert cli.main(["bench", "--n-prompts", "1", "--max-new-tokens", "6", "--draft", "self",
                     "--out", str(tmp_path / "b.md")]) == 0
    text = (tmp_path / "b.md").read_text()
    assert "drafter the target itself (1 layers shared, 2 nf4 copies" in text and "| hf-assisted |" in text


@pytest.mark.parametrize("codec", lowbit.CODECS)
def test_each_codec_saves_and_restores_the_same_layer(codec):
    if codec.startswith("hqq"):
        pytest.importorskip("hqq")
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=True)
    copy = lowbit.quantize(linear, codec, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = copy(x)
        state, meta = lowbit.tensors(copy, codec)
        again = lowbit.restore({k: v.clone() for k, v in state.items()}, meta, codec, torch.device("cpu"), torch.float32)
        assert torch.equal(again(x), y)
        err = (lowbit.dequantized(copy, codec).float() - linear.weight).norm() / linear.weight.norm()
    assert err < {"int8": 0.01, "hqq4": 0.08, "nf4": 0.1, "fp4": 0.13, "hqq3": 0.15, "hqq2": 0.35}[codec]
    assert lowbit.nbytes(copy) <= lowbit.copy_bytes((64, 128), codec) + 64 * 4 + 512  # + bias, a few scalars


def test_an_int8_copy_computes_with_its_dequantized_weight_on_a_cpu():
    """In eval mode bitsandbytes' int8 route quantizes the activations too (here without LLM.int8's outlier
    split it is ~4 % off on activations with outlier features; SmolLM2's int8 self-drafter then accepted
    10.3 instead of 15.2 tokens per pass at K=64). On a CPU the copy multiplies by its de-quantized weight;
    elsewhere it keeps bitsandbytes' route with the outlier split."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    copy = lowbit.quantize(linear, "int8", torch.device("cpu"), torch.float32).eval()
    x = torch.randn(1, 16, 256)
    x[..., :4] *= 40  # outlier features, as LLM activations have
    with torch.no_grad():
        y = copy(x)
        want = torch.nn.functional.linear(x, lowbit.dequantized(copy, "int8").float(), linear.bias)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    assert copy.state.threshold == lowbit.INT8_THRESHOLD == 6.0
