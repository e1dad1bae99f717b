"""A target split across processes by layer ranges (edgespec/distributed/): 2 and 3 local processes over
gloo on loopback give exactly the single process's tokens (greedy, budgets 0/16/256, and a seeded draw),
with resident and streamed ranges mixed; each stage holds only its own layers; a killed stage is named
within the set timeout, the conversation survives, and the restarted stage rejoins."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import noisy_copy, tiny_model, tiny_tokenizer
from edgespec import Engine
from edgespec.base.errors import InvalidArgumentError, StageFailedError
from edgespec.distributed.group import Timeouts, check_address
from edgespec.distributed.hops import Net
from edgespec.distributed.placement import Placement, auto_split
from edgespec.distributed.target import PipelineTarget

LAYERS = 4
PROMPT = [5, 9, 13, 2, 40, 7, 31]
FAST = Timeouts(op=60.0, dead_after=3.0, join=60.0, load=120.0, beat=0.1)


def stage_process(rank: int, world: int, port: int, spec: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "edgespec.distributed.stage", "--coordinator", f"127.0.0.1:{port}", "--rank",
           str(rank), "--world", str(world), "--device", "cpu", "--quiet", "--op-timeout", "300"]
    cmd += ["--model", spec] if spec is not None else []
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Pipeline:
    """Stage 0 here, the other stages as processes; always stopped."""

    def __init__(self, spec: str, stages: str, timeouts: Timeouts = FAST, emulate: Net | None = None):
        self.spec = spec
        self.target = PipelineTarget(spec, Placement.parse(stages), torch.device("cpu"), timeouts=timeouts,
                                     progress=False, emulate=emulate)
        self.procs = {r: stage_process(r, self.target.world, self.target.port, spec) for r in range(1, self.target.world)}
        try:
            self.target.start()
        except BaseException:
            self.close()
            raise

    def restart(self, rank: int) -> None:
        self.procs[rank] = stage_process(rank, self.target.world, self.target.port, self.spec)

    def close(self) -> None:
        self.target.close()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4")
    tiny_model("llama", init=0.5, layers=LAYERS).save_pretrained(path)
    return str(path)


def engines(spec_dir: str, pipeline: Pipeline, budget):
    whole = tiny_model("llama", init=0.5, layers=LAYERS)
    drafter = noisy_copy(whole, scale=0.002)
    tok = tiny_tokenizer()
    split = Engine(pipeline.target.model, drafter, tok, budget=budget, verifier=pipeline.target)
    return Engine(whole, drafter, tok, budget=budget), split


@pytest.mark.parametrize("stages", [
    "127.0.0.1:0-1,127.0.0.1:2-3:0",  # 2 processes: stage 1 streams its layers
    "127.0.0.1:0-0:0,127.0.0.1:1-2:1,127.0.0.1:3-3",  # 3 processes: streamed, mixed, resident
])
def test_split_target_equals_single_process(model_dir, stages):
    pipe = Pipeline(model_dir, stages)
    try:
        for budget in (0, 16, 256):
            whole, split = engines(model_dir, pipe, budget)
            a = whole.generate(PROMPT, max_new_tokens=24, temperature=0)
            b = split.generate(PROMPT, max_new_tokens=24, temperature=0)
            assert b.ids == a.ids, budget
            if budget == 16:
                assert b.stats.accepted_per_pass > 1  # trees were accepted, not only bonus tokens
            again = split.generate(PROMPT + a.ids[:5], max_new_tokens=12, temperature=0)  # a turn: cache reused
            assert again.ids == whole.generate(PROMPT + a.ids[:5], max_new_tokens=12, temperature=0).ids
        whole, split = engines(model_dir, pipe, 16)
        kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=11)
        assert split.generate(PROMPT, **kw).ids == whole.generate(PROMPT, **kw).ids
    finally:
        pipe.close()


def test_each_stage_holds_only_its_layers(model_dir):
    whole = tiny_model("llama", init=0.5, layers=LAYERS)
    per_layer = len(list(whole.model.layers[0].parameters()))
    pipe = Pipeline(model_dir, "127.0.0.1:0-0,127.0.0.1:1-3:1")
    try:
        stage0 = pipe.target.stage
        assert stage0.tensor_count() == per_layer + 1  # one layer and the embeddings: no norm, no head
        assert stage0.model.lm_head is None
        rss = {r: psutil.Process(p.pid).memory_info().rss for r, p in pipe.procs.items()}
        assert all(v > 0 for v in rss.values())
    finally:
        pipe.close()
    from edgespec.distributed.layers import Range, load_range

    last = load_range(model_dir, Range(1, 4, LAYERS, 1), torch.device("cpu"))
    assert last.tensor_count() == 3 * per_layer + 2  # three layers, the final norm and the head
    assert last.model.get_input_embeddings() is None


def test_round_trip_measures_the_transport_alone(model_dir):
    """A PING crosses every stage and comes back as a pass's messages would, with no compute; what an
    emulated network sleeps is taken out, so what is left is the transport's own cost per pass."""
    pipe = Pipeline(model_dir, "127.0.0.1:0-0,127.0.0.1:1-2,127.0.0.1:3-3", emulate=Net("slow", 1e12, 0.2))
    try:  # stage 0's sends sleep 200 ms each
        assert 0 < pipe.target.transport_s < 0.2  # measured at start, through 3 processes, the sleeps out
        before = pipe.target.traffic()
        start = time.monotonic()
        transport = pipe.target.round_trip(rounds=3)
        assert time.monotonic() - start >= 3 * 0.2  # the pings went through the emulated network...
        assert 0 < transport < 0.2  # ...and its sleep is not counted as transport
        sent, _, back, _ = (a - b for a, b in zip(pipe.target.traffic(), before))
        assert (sent, back) == (3, 3)  # one message down and one verdict back per ping
        whole, split = engines(model_dir, pipe, 16)  # the stages still serve passes after pings
        assert split.generate(PROMPT, max_new_tokens=8, temperature=0).ids == \
            whole.generate(PROMPT, max_new_tokens=8, temperature=0).ids
    finally:
        pipe.close()


def test_killed_stage_is_named_and_rejoins(model_dir):
    pipe = Pipeline(model_dir, "127.0.0.1:0-0,127.0.0.1:1-2,127.0.0.1:3-3")
    try:
        whole, split = engines(model_dir, pipe, 16)
        first = split.generate(PROMPT, max_new_tokens=8, temperature=0)
        ids = list(split.conversation.ids)
        pipe.procs[1].kill()
        pipe.procs[1].wait()
        start = time.monotonic()
        with pytest.raises(StageFailedError, match="stage 1") as err:
            split.generate(PROMPT + first.ids, max_new_tokens=8, temperature=0)
        assert err.value.stage == 1
        assert time.monotonic() - start < FAST.dead_after + 10
        assert split.conversation.ids[: len(ids)] == ids  # the conversation is kept
        pipe.restart(1)
        again = split.generate(PROMPT + first.ids, max_new_tokens=8, temperature=0)
        assert again.ids == whole.generate(PROMPT + first.ids, max_new_tokens=8, temperature=0).ids
    finally:
        pipe.close()


def test_placement_parsing_and_auto_split():
    p = Placement.parse("10.0.0.1:0-11,10.0.0.2:12-29:4")
    assert p.counts(30, [1, 1]) == [12, 18] and p.stages[1].resident == 4
    assert Placement.parse("127.0.0.1:8,127.0.0.1:22").counts(30, [1, 1]) == [8, 22]
    assert auto_split(30, [10, 20]) == [10, 20]
    assert auto_split(4, [100, 1, 1]) == [2, 1, 1]
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        Placement.parse("a:0-3,b:5-9").counts(10, [1, 1])
    with pytest.raises(InvalidArgumentError, match="model has 30"):
        Placement.parse("a:0-3,b:4-9").counts(30, [1, 1])


def test_public_address_refused_without_flag():
    check_address("127.0.0.1")
    check_address("192.168.1.20")
    with pytest.raises(InvalidArgumentError, match="no authentication"):
        check_address("8.8.8.8")
    with pytest.raises(InvalidArgumentError, match="allow-public"):
        check_address("0.0.0.0")
    check_address("8.8.8.8", allow_public=True)


def test_mismatched_model_is_refused(model_dir, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", init=0.5, layers=LAYERS, seed=3).save_pretrained(other)
    target = PipelineTarget(model_dir, Placement.parse("127.0.0.1:0-1,127.0.0.1:2-3"), torch.device("cpu"),
                            timeouts=FAST, progress=False)
    proc = stage_process(1, 2, target.port, str(other))
    try:
        with pytest.raises(StageFailedError, match="different model file"):
            target.start()
        assert proc.wait(timeout=30) != 0
        assert b"refused" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_embedded_default_split_equals_single_process(real_pair):
    """SmolLM2-135M's GGUF split over 2 processes (stage 1: 8 layers resident, 7 streamed as the file's
    blocks) gives the whole model's greedy tokens; stage 1's process holds its half, not the model."""
    target, drafter, tok = real_pair
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    pipe = Pipeline(None, "127.0.0.1:0-14,127.0.0.1:15-29:8",
                    Timeouts(op=300.0, dead_after=10.0, join=300.0, load=600.0))
    try:
        for budget in (0, 16, 256):
            whole = Engine(target, drafter, tok, budget=budget)
            split = Engine(pipe.target.model, drafter, tok, budget=budget, verifier=pipe.target)
            want = whole.generate(prompt, max_new_tokens=16, temperature=0).ids
            assert split.generate(prompt, max_new_tokens=16, temperature=0).ids == want, budget
        whole_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
        layer_bytes = sum(p.numel() * p.element_size() for p in target.model.layers.parameters()) / 30
        stage0 = pipe.target.stage
        assert stage0.tensor_count() == 15 * len(list(target.model.layers[0].parameters())) + 1
        rss = psutil.Process(pipe.procs[1].pid).memory_info().rss
        bare = _bare_rss()
        # stage 1: 8 resident layers fp32, 7 streamed as Q4_1 blocks, the (tied) head: well under the model
        assert rss - bare < whole_bytes - 10 * layer_bytes, (rss, bare, whole_bytes)
    finally:
        pipe.close()


def _bare_rss() -> int:
    """A process that imported what a stage imports, and loaded nothing."""
    code = ("import psutil, edgespec.distributed.stage, transformers, transformers.models.llama.modeling_llama;"
            "print(psutil.Process().memory_info().rss)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_stage_command_refuses_a_public_bind(capsys):
    from edgespec.front import cli

    code = cli.main(["stage", "--coordinator", "127.0.0.1:1", "--rank", "1", "--world", "2", "--bind", "8.8.8.8"])
    assert code == 2
    assert "no authentication" in capsys.readouterr().err
