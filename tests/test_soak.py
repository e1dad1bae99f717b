"""Long sessions: 300 chat turns on tiny models; caches and process memory stay bounded."""
import gc

import psutil
import pytest

from edgespec import Engine
from edgespec.base.stats import Plan
from tests.conftest import Fixed, tiny_pair

pytestmark = pytest.mark.slow


def test_300_turns_stay_bounded():
    target, drafter = tiny_pair("llama", init=0.1)
    engine = Engine(target, drafter, scheduler=Fixed(Plan(16, 6, 4, 16)), max_context=200)
    proc = psutil.Process()
    history: list[int] = []
    rss = []
    for turn in range(300):
        user = [(turn * 7 + k) % 60 + 1 for k in range(4)]
        if len(history) + len(user) + 8 >= engine.max_context:
            history = history[len(history) // 2:]  # drop the oldest half, as a chat app would
        prompt = history + user
        out = engine.generate(prompt, max_new_tokens=6)
        history = prompt + out.ids
        committed = len(history)
        tlen, dlen = engine.state.lengths()
        assert tlen <= committed - 1 and dlen <= committed - 1, (turn, tlen, dlen, committed)
        assert tlen < engine.max_context
        if turn % 25 == 0:
            gc.collect()
            rss.append(proc.memory_info().rss)
    growth = rss[-1] - rss[2]
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 250 turns"
