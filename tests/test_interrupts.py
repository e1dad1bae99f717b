"""A step is atomic: Ctrl-C (or an error, or a cancel) at a random instant inside the drafting, the target's
pass (mid-layer), the pruning or the detokeniser leaves a conversation whose next greedy turn is exactly
the target's own answer to it (transformers' generate on the same prompt), in chat and in the server's
worker, over every cache the drafter and the target use (tests/faults.py injects the faults)."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from edgespec import Engine
from edgespec.front.server.metrics import Metrics
from edgespec.front.server.worker import Job, Worker
from tests.conftest import chat_session, greedy_reference, noisy_copy, tiny_model, tiny_tokenizer
from tests.faults import SITES, FaultInjector

MAX_NEW = 8
QUESTIONS = ["hello world", "what is the capital of france", "the cat and the dog", "one two three",
             "is the sky blue or green", "you are a helpful model"]
CONFIGS = {  # drafter forward (its cache: transformers' DynamicCache, lean over it, lean over StaticKV), offload
    "lean": ({}, False),
    "transformers": ({"forward": "transformers"}, False),
    "static": ({"forward": "static"}, False),
    "offload": ({}, True),  # the pass in this thread: the tracers reach the streamer's hooks
    "offload-overlap": ({"overlap": True}, True),  # the pass in a worker thread, drafting meanwhile
}


def engine_for(config: str) -> Engine:
    options, offload = CONFIGS[config]
    target = tiny_model("llama", init=0.5, layers=3)
    drafter = noisy_copy(target, scale=0.002)
    if offload:
        from edgespec.offload import offload_layers

        offload_layers(target, "cpu", resident_layers=1, progress=False)
    return Engine(target, drafter, tiny_tokenizer(), budget=4, **options)


def recording(engine: Engine) -> list:
    """Keep every Run the engine hands out (the chat's last one carries the answer's token ids)."""
    runs, real = [], engine.run

    def run(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    engine.run = run
    return runs


def assert_exact_next_turn(session, engine, runs, question: str) -> None:
    session.ask(question)
    prompt = engine.encode(session.messages[:-1])
    want = greedy_reference(engine.target, prompt, MAX_NEW)
    assert runs[-1].result.ids == want, f"after the fault the next turn differs from generate's: {session.messages}"
    assert len(set(engine.state.tcache.layer_lengths())) == 1 and len(set(engine.state.dcache.layer_lengths())) == 1


@pytest.mark.parametrize("config", list(CONFIGS))
def test_chat_survives_interrupts_at_random_instants(config):
    engine = engine_for(config)
    session, _, err = chat_session(engine, max_new_tokens=MAX_NEW)
    runs, rng, fired = recording(engine), random.Random(config), 0
    inj = FaultInjector(seed=len(config))
    for trial in range(50):
        if session.messages and len(engine.encode(session.messages)) > 150:
            session.reset()
        if trial % 3 == 0:
            session.ask(rng.choice(QUESTIONS))  # a turn before the interrupted one
        inj.arm(engine, SITES[trial % len(SITES)])
        try:
            session.ask(rng.choice(QUESTIONS))
        except KeyboardInterrupt:  # (caught here: escaping, it would end the whole test session)
            pytest.fail(f"Ctrl-C at {inj.site} escaped the chat")
        finally:
            inj.disarm()
        fired += inj.fired
        assert_exact_next_turn(session, engine, runs, rng.choice(QUESTIONS))
    assert "error" not in err.getvalue()
    assert fired >= 30, f"only {fired} of 50 faults went off"


@pytest.mark.parametrize("config", ["lean", "offload-overlap"])
def test_worker_survives_failures_and_cancels(config):
    """A request failing (an error at a random instant) or cancelled (its client gone) leaves the next
    request, which extends its conversation, exact."""
    engine = engine_for(config)
    worker, loop = Worker(engine, Metrics()), asyncio.new_event_loop()
    rng, fired, messages = random.Random(config), 0, []
    try:
        for trial in range(25):
            if messages and len(engine.encode(messages)) > 150:
                messages = []
            messages = messages + [{"role": "user", "content": rng.choice(QUESTIONS)}]
            job = Job(list(messages), MAX_NEW, {}, [], loop)
            inj = FaultInjector(seed=trial, error=RuntimeError if trial % 2 else job.cancel.set)
            inj.arm(engine, SITES[trial % len(SITES)])
            try:
                worker._run(job)
            finally:
                inj.disarm()
            fired += inj.fired
            prompt, ids = engine.encode(messages), engine.state.ids
            partial = engine.tokenizer.decode(ids[len(prompt):]) if ids[: len(prompt)] == prompt else ""
            messages += [{"role": "assistant", "content": partial},
                         {"role": "user", "content": rng.choice(QUESTIONS)}]
            worker._run(Job(list(messages), MAX_NEW, {}, [], loop))
            assert worker.last.ids == greedy_reference(engine.target, engine.encode(messages), MAX_NEW)
            messages.append({"role": "assistant", "content": worker.last.text})
    finally:
        loop.close()
    assert fired >= 15, f"only {fired} of 25 faults went off"


def test_streamer_survives_an_interrupt_at_every_instant():
    """Ctrl-C at each line the streamer's hooks run in turn (acquiring, waiting, binding, releasing,
    restarting): the next pass over the streamed layers gives the resident model's logits."""
    from edgespec.offload import offload_layers

    plain = tiny_model("llama", init=0.5, layers=4)
    model = tiny_model("llama", init=0.5, layers=4)
    offload_layers(model, "cpu", resident_layers=1, progress=False)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        want = plain(ids).logits
        inj, n = FaultInjector(seed=0), 0
        while True:
            n += 1
            inj.arm(None, "stream", at=n)
            try:
                model(ids)
            except KeyboardInterrupt:
                pass
            finally:
                inj.disarm()
            torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
            if not inj.fired:
                break
    assert n > 50, f"the sweep covered only {n - 1} instants"


@pytest.mark.slow
def test_embedded_default_chat_survives_interrupts(real_pair):
    """The embedded default (SmolLM2-135M-Instruct, an nf4 copy drafting): a Ctrl-C in each part of a step,
    each next turn exactly the target's own answer."""
    target, drafter, tokenizer = real_pair
    engine = Engine(target, drafter, tokenizer, budget=8)
    session, _, err = chat_session(engine, max_new_tokens=16, sampling={"temperature": 0})
    runs, inj, fired = recording(engine), FaultInjector(seed=3), 0
    session.ask("Tell me a story about a dragon.")
    for site in SITES:
        inj.arm(engine, site, at=2 if site in ("draft", "pass") else None)  # (a short answer: few steps)
        try:
            session.ask("Tell me a long story about a lighthouse keeper.")
        finally:
            inj.disarm()
        fired += inj.fired
        session.ask("What is 2+2?")
        prompt = engine.encode(session.messages[:-1])
        want = target.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        assert runs[-1].result.ids == want
    assert "error" not in err.getvalue() and fired >= 4


def test_check_evens_out_what_a_cut_short_forward_left():
    """Layers of different lengths (a forward stopped after its first layer, a layer whose keys were
    written but not its values, a layer never reached) are cropped to the shortest, at most len(ids) - 1."""
    from edgespec.core.kv import new_cache
    from edgespec.engine.conversation import Conversation

    model = tiny_model("llama", layers=3)
    tcache, dcache = new_cache(model), new_cache(model)
    kv = lambda n: torch.randn(1, 2, n, 8)  # noqa: E731
    tcache.update(kv(9), kv(9), 0), tcache.update(kv(9), kv(7), 1)  # layer 2 never reached
    for i in range(3):
        dcache.update(kv(6), kv(6), i)
    conv = Conversation(tcache, dcache)
    conv.ids = list(range(8))
    assert tcache.layer_lengths() == [9, 7, 0] and conv.check()
    assert tcache.layer_lengths() == [0, 0, 0] and dcache.layer_lengths() == [6, 6, 6]
    dcache.update(kv(3), kv(3), 0)
    assert conv.check() and dcache.layer_lengths() == [6, 6, 6] and not conv.check()


def test_overlap_waits_for_the_pass_through_ctrl_c():
    """Ctrl-C while drafting during the pass, then again while waiting for it: the pass (which writes
    the target's cache) has ended when the interrupt reaches the step. (Thread.join would not do:
    interrupted, it leaves is_alive() False while the thread runs on, Python < 3.13.)"""
    import signal
    import threading
    import time

    from edgespec.base.stats import Plan
    from edgespec.engine.overlap import Overlap

    ended = []

    def verify():
        time.sleep(0.6)
        ended.append(True)

    class Search:
        def grow(self, plan, rounds=None):
            raise KeyboardInterrupt

    main = threading.main_thread().ident  # a real SIGINT to the main thread: it cuts a blocked wait short
    again = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
    again.start()
    with pytest.raises(KeyboardInterrupt):
        Overlap().verify_while_drafting(verify, Search(), Plan(4, 4, 2, 4))
    again.join()
    assert ended, "the step went on while the pass still wrote the target's cache"
