"""Smoke tests of the benchmark scripts on tiny models (the real runs are committed under benchmarks/)."""
import importlib.util
from pathlib import Path

from edgespec import Engine
from edgespec.offload import offload_layers
from tests.conftest import noisy_copy, tiny_model, tiny_pair

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_acceptance_script(capsys):
    target = tiny_model("llama", init=0.5)  # peaked, with a close drafter: drafts are often accepted
    drafter = noisy_copy(target, scale=0.002)
    before = drafter.generation_config.to_dict()
    rows = load("acceptance").main(["--budgets", "1,8", "--chains", "default,1,4", "--max-new-tokens", "12"],
                                   pair=(target, drafter, None), prompts=[[1, 2, 3], [4, 5, 6, 7]])
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["assisted (HF default schedule)", "assisted (constant chain 1)",
                                           "assisted (constant chain 4)", "edgespec K=1", "edgespec K=8"]
    assert rows[1]["passes"] > rows[2]["passes"], "the chain length must reach the assistant"
    assert drafter.generation_config.to_dict() == before
    assert all(r["equal"] for r in rows), "every method must reproduce the target's greedy output"
    assert all(r["tokens"] / r["passes"] >= 1.0 for r in rows)
    assert "| edgespec K=8 |" in out


def test_acceptance_script_sampling(capsys):
    target = tiny_model("llama", init=0.5)
    drafter = noisy_copy(target, scale=0.002)
    rows = load("acceptance").main(["--budgets", "8", "--chains", "default", "--max-new-tokens", "12",
                                    "--temperature", "0.7", "--seed", "3"],
                                   pair=(target, drafter, None), prompts=[[1, 2, 3], [4, 5, 6, 7]])
    out = capsys.readouterr().out
    assert "sampling at temperature 0.7" in out
    assert all(r["equal"] is None and r["tokens"] == 24 for r in rows)
    assert rows[1]["tokens"] / rows[1]["passes"] > 1.0  # a close drafter's samples are often accepted


def test_bench_scheduler_script(capsys, monkeypatch):
    target, drafter = tiny_pair("llama", init=0.1, layers=4)
    offload_layers(target, "cpu", resident_layers=0, progress=False, link_delay=0.001)
    base = Engine(target, drafter, budget=4)
    mod = load("bench_scheduler")
    monkeypatch.setattr(Engine, "encode", lambda self, prompt: [1, 2, 3])  # tiny models have no tokenizer
    rows = mod.main(["--budgets", "4,16", "--max-new-tokens", "10"], base=base, prompts=["a", "b"])
    out = capsys.readouterr().out
    assert len(rows) == 6 and "all outputs identical: True" in out
    assert all(r["tokens"] == 20 for r in rows)


def test_profile_draft_script(capsys):
    load("profile_draft").main(["--device", "cpu", "--quant", "none", "--budgets", "1,4", "--layers", "2"])
    out = capsys.readouterr().out
    for how in ("transformers", "lean", "static"):
        assert f"unquantized {how} drafter forward, 64 tokens:" in out
        assert f"unquantized {how} tree build K=4:" in out
    assert out.count("(size 4,") == 3


def test_profile_load_script(capsys, tmp_path):
    """Two child processes (whole, layerwise); both must give the same logits and keep the same bytes."""
    rows = load("profile_load").main(["--shape", "tiny", "--dtype", "fp32", "--quantize", "int8",
                                      "--folder", str(tmp_path / "tiny")])
    out = capsys.readouterr().out
    assert [(r["way"], r["quant"]) for r in rows] == [("whole", "int8"), ("layerwise", "int8")]
    assert "| int8 | layerwise |" in out and out.count("| yes |") == 2
    assert rows[0]["streamed_host_bytes"] == rows[1]["streamed_host_bytes"] > 0


def test_moe_experts_script(capsys):
    """One token touches exactly top-k experts per layer; a 16-token tree at least that many."""
    rows = load("moe_experts").main(["--drafter", "tiny", "--sizes", "1,16", "--n-prompts", "1", "--layers", "2"])
    out = capsys.readouterr().out
    one = [r for r in rows if r["tokens"] == 1]
    assert len(one) == 3 and all(r["measured"] == r["top_k"] / r["experts"] == r["layer_max"] for r in one)
    assert all(r["top_k"] / r["experts"] < r["measured"] <= 1 for r in rows if r["tokens"] == 16)
    assert "| Mixtral-8x7B | 8 | 2 | 0.250 | 0.990 |" in out
