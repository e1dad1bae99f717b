"""`edgespec profile` and `edgespec bench` on tiny models (an injected engine, offloaded target)."""
from __future__ import annotations

import json

import pytest

from edgespec.front import cli
from tests.conftest import tiny_engine


@pytest.fixture
def injected(monkeypatch):
    engine = tiny_engine(budget=8, offload=True, layers=3)  # fixed: deterministic trees
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    return engine


def test_profile_writes_json_and_png(injected, tmp_path, capsys):
    sizes = [1, 4, 16, 32]
    argv = ["profile", "--out-dir", str(tmp_path), "--sizes", ",".join(map(str, sizes)), "--budgets", "2,8",
            "--prompts", "2", "--max-new-tokens", "8", "--prefix", "16"]
    assert cli.main(argv) == 0, capsys.readouterr().err  # needs matplotlib (in the 'test' and 'plot' extras)
    r = json.loads((tmp_path / "profile.json").read_text())
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["bandwidth"]["bytes_per_s"] > 0
    mem = r["memory"]
    assert mem["weight_bytes"] > 0 and mem["rss_after_load"] >= mem["weight_bytes"]
    assert mem["rss_peak_while_loading"] >= mem["rss_after_load"]
    assert mem["pinned_bytes"] == injected.offload.pinned_bytes > 0
    assert [p["tokens"] for p in r["pass_time"]] == sizes and all(p["pass_s"] > 0 for p in r["pass_time"])
    assert all(p["transfer_s"] >= 0 and p["compute_s"] > 0 for p in r["pass_time"])
    assert [d["budget"] for d in r["draft_time"]] == [2, 8]
    assert all(d["draft_s"] > 0 and 0 < d["tree_size"] <= d["budget"] for d in r["draft_time"])
    gen = r["generation"]
    assert sum(gen["acceptance_histogram"].values()) == gen["steps"] > 0
    assert gen["tokens_per_s"] > 0 and gen["per_layer"]["compute_s"] > 0
    assert max(int(k) for k in gen["acceptance_histogram"]) > 1, "some steps should accept draft tokens"
    out = capsys.readouterr().out
    assert "target pass vs tree size" in out and "histogram" in out


def test_profile_rejects_bad_sizes(injected, tmp_path, capsys):
    assert cli.main(["profile", "--out-dir", str(tmp_path), "--sizes", "1,x"]) == 2
    assert "edgespec: error: --sizes" in capsys.readouterr().err


def test_bench_prints_three_rows_with_the_same_output(injected, tmp_path, capsys):
    report = tmp_path / "bench.md"
    argv = ["bench", "--n-prompts", "2", "--max-new-tokens", "8", "--out", str(report)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["edgespec", "plain", "hf-assisted"]
    assert [r.rstrip(" |").rsplit("|", 1)[-1].strip() for r in rows] == ["yes", "reference", "yes"], out
    text = report.read_text()
    assert "- command: `edgespec bench --n-prompts 2" in text and "torch" in text and "| plain |" in text
    assert "- edgespec time split: drafting" in text and "- plain time split" in text


def test_bench_samples_when_asked(injected, tmp_path, capsys):
    """--temperature is not ignored: every method samples; edgespec draws exactly plain decoding's tokens
    for the same seed, HF assisted draws from its own random stream (not compared)."""
    report = tmp_path / "bench.md"
    argv = ["bench", "--n-prompts", "2", "--max-new-tokens", "10", "--temperature", "0.9", "--seed", "4",
            "--out", str(report)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.rstrip(" |").rsplit("|", 1)[-1].strip() for r in rows] == ["yes", "reference", "n/a (own sampler)"]
    text = report.read_text()
    assert "sampling at temperature 0.9" in text and "same sampling seed (temperature 0.9, top-p 1.0, seed 4)" in text
    greedy = injected.generate(injected.encode([{"role": "user", "content": "x"}]), max_new_tokens=10).ids
    sampled = injected.generate(injected.encode([{"role": "user", "content": "x"}]), max_new_tokens=10,
                                temperature=0.9, seed=4).ids
    assert greedy != sampled  # the tiny target's distribution is broad enough for sampling to show


def test_bench_json(injected, capsys):
    assert cli.main(["bench", "--n-prompts", "1", "--max-new-tokens", "6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["plain"]["tokens_per_pass"] == pytest.approx(1.0)
    assert rows["edgespec"]["tokens_per_pass"] > 1.0
    assert all(r["same_output"] and r["new_tokens"] == 6 for r in rows.values())
    assert data["divergences"] == []


def test_bench_names_where_outputs_part_and_whether_it_is_a_tie():
    """A method whose tokens leave plain decoding's is reported with the target's top-2 gap there."""
    import torch

    from edgespec.front import bench
    from tests.conftest import greedy_reference, tiny_model

    target = tiny_model("llama", init=0.5)
    ids = [3, 14, 15, 9, 2]
    ref = greedy_reference(target, ids, 6)
    with torch.no_grad():
        logits = target(torch.tensor([ids + ref[:3]])).logits[0, -1]
    second = logits.topk(2).indices[1].item()
    other = ref[:3] + [second, 7, 7]
    runs = lambda seq: [{"ids": seq}]  # noqa: E731
    outputs = {"edgespec": runs(ref), "plain": runs(ref), "hf-assisted": runs(other)}
    found = bench.divergences(target, [ids], outputs)
    assert [(d["method"], d["prompt"], d["token"]) for d in found] == [("hf-assisted", 0, 3)]
    gap = (logits.topk(2).values[0] - logits.topk(2).values[1]).item()
    assert found[0]["gap"] == pytest.approx(gap, rel=1e-4) and found[0]["ulp"] < 1e-5
    assert found[0]["tie"] is (gap <= bench.TIE_ULPS * found[0]["ulp"])  # fp32: only a genuine tie is one
    assert bench.first_difference([1, 2], [1, 2]) is None and bench.first_difference([1, 2], [1, 2, 3]) == 2
