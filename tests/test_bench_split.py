"""`edgespec bench --stages`: the bench across 2 local processes (gloo on loopback) with an emulated
network per hop gives the single process's greedy tokens, an edgespec and a plain row (HF assisted
skipped, saying why), and each row's hops counted and priced on the emulated network."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from edgespec import Engine
from edgespec.engine.prompts import chat_messages, load_prompts
from edgespec.front import bench, cli

HOP = 0.01  # emulated seconds per message, on stage 0's sends and stage 1's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage1(port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "edgespec.distributed.stage", "--coordinator", f"127.0.0.1:{port}", "--rank", "1", "--world", "2", "--device", "cpu", "--quiet",
            "--hop-latency", str(HOP), "--hop-gbps", "1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_bench_across_two_processes_equals_single_process(real_pair, tmp_path, monkeypatch, capsys):
    target, drafter, tok = real_pair
    port = free_port()
    seen = {}
    run = bench.run_bench

    def spy(engine, *a, **k):
        seen["engine"] = engine
        seen["result"] = run(engine, *a, **k)
        return seen["result"]

    monkeypatch.setattr(bench, "run_bench", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two processes on (at most) two cores
    proc = stage1(port)
    report = tmp_path / "bench.md"
    try:
        code = cli.main(["bench", "--stages", "127.0.0.1:0-14,127.0.0.1:15-29:8", "--stage-port", str(port),
                         "--hop-latency", str(HOP), "--hop-gbps", "1", "--n-prompts", "1", "--max-new-tokens", "12",
                         "--budget", "16", "--draft-quant", "none", "--out", str(report)])
        assert code == 0, capsys.readouterr().err
        seen["engine"].verifier.close()  # STOP down the stages: stage 1 leaves its loop
        assert proc.wait(timeout=60) == 0
    finally:
        torch.set_num_threads(threads)
        if proc.poll() is None:
            proc.kill()
    result = seen["result"]
    prompt = chat_messages(load_prompts(1, None)[0][0])
    want = Engine(target, drafter, tok, budget=0).generate(prompt, max_new_tokens=12, temperature=0).ids
    assert result["outputs"]["edgespec"] == [want]
    assert result["outputs"]["plain"] == [want]
    assert [r["method"] for r in result["rows"]] == ["edgespec", "plain"]
    text = report.read_text()
    assert "| edgespec |" in text and "| plain |" in text and "| hf-assisted |" not in text
    assert "hf-assisted: skipped: transformers' assisted generation needs the whole target" in text
    assert "stage 1 (127.0.0.1): layers 15-29, 8 resident, 7 streamed + norm + head" in text
    for name in ("edgespec", "plain"):
        hops, row = result["split"]["hops"][name], next(r for r in result["rows"] if r["method"] == name)
        assert hops["messages_back"] == row["passes"]  # one verdict per target pass
        assert hops["messages_down"] >= row["passes"]  # a forward per pass, and the cache surgery
        assert hops["emulated_s"] >= HOP * (hops["messages_down"] + hops["messages_back"])
        assert hops["seconds"] >= hops["emulated_s"]  # the emulated hops were slept, on the run's clock
        assert f"- {name} hops: {hops['messages_down']} messages down" in text
        assert hops["transport_s"] == pytest.approx(hops["messages_back"] * result["split"]["transport_s_per_pass"])
    assert 0 < result["split"]["transport_s_per_pass"] < 1.0  # the round trip measured at start, emulation out
    assert "- the transport's own round trip (measured at start): " in text


@pytest.mark.parametrize("argv, says", [
    (["--hop-latency", "0.1"], "--hop-latency emulates the network between the stages of a split target: give --stages"),
    (["--stages", "127.0.0.1:0-1,127.0.0.1:2-3", "--hop-gbps", "0"], "--hop-gbps must be a finite number > 0"),
    (["--stages", "127.0.0.1:0-1,127.0.0.1:2-3", "--hop-latency", "-1"], "--hop-latency must be a finite number >= 0"),
    (["--stages", "127.0.0.1:0-1,127.0.0.1:2-3", "--draft", "self"], "--draft 'self' does not apply with --stages"),
    (["--stages", "127.0.0.1:0-1,127.0.0.1:2-3", "--resident-layers", "2"], "HOST:LAYERS:RESIDENT instead"),
    (["--stages", "127.0.0.1:0-1,127.0.0.1:2-3", "--target-shape", "llama-8b"], "not zero-padded"),
])
def test_bad_split_combinations_are_refused_before_loading(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(cli, "make_engine", lambda args: pytest.fail("no model loads for a refused command"))
    assert cli.main(["bench", *argv]) == 2
    assert says in capsys.readouterr().err


def test_emulated_hops_are_the_sleeps_each_sender_adds():
    from edgespec.distributed.hops import Net, emulated_seconds

    a, b = Net("a", 1e6, 0.01), Net("b", 2e6, 0.02)
    assert emulated_seconds([a, b], (3, 1000), (2, 400)) == pytest.approx(3 * 0.01 + 1000 / 1e6 + 2 * 0.02 + 400 / 2e6)
    assert emulated_seconds([a, None, b], (3, 1000), (2, 400)) == pytest.approx(0.03 + 0.001 + 0.04 + 0.0002)
    assert emulated_seconds([None, None], (3, 1000), (2, 400)) == 0.0
