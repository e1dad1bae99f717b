"""The per-step rest (a step's time besides drafting before the pass and the pass itself) split into
named parts: planning, graph capture, pruning, re-rooting, observing, text, other."""
from __future__ import annotations

import json

import pytest

from edgespec.base.stats import REST_PARTS, Totals
from edgespec.front import cli
from tests.conftest import tiny_engine


def test_the_parts_sum_to_each_steps_rest():
    engine = tiny_engine(budget=8)
    out = engine.generate([1, 2, 3, 4], max_new_tokens=12, stop=["zz"])
    assert out.stats.steps
    for step in out.stats.steps:
        assert list(step.rest) == list(REST_PARTS)
        assert all(v >= 0.0 for v in step.rest.values())
        assert sum(step.rest.values()) == pytest.approx(step.overhead_time, rel=1e-9, abs=1e-12)
        assert step.rest["plan"] > 0 and step.rest["prune"] > 0 and step.rest["text"] > 0
        assert step.draft_forwards >= 1 and step.draft_fed >= step.draft_forwards  # a tree was drafted
    totals = Totals.of([out.stats])
    assert sum(totals.rest.values()) == pytest.approx(totals.overhead_time, rel=1e-9)
    # the steps (drafting + pass + rest) account for the run's wall time, less what the run does once
    assert sum(s.step_time for s in out.stats.steps) <= out.stats.wall_time


def test_a_plain_step_drafts_nothing_and_still_splits_its_rest():
    engine = tiny_engine(budget=0)
    out = engine.generate([1, 2, 3], max_new_tokens=4)
    for step in out.stats.steps:
        assert step.draft_forwards == 0 and step.rest["capture"] == 0.0 and step.rest["reroot"] == 0.0
        assert sum(step.rest.values()) == pytest.approx(step.overhead_time, rel=1e-9, abs=1e-12)


def test_bench_json_and_report_show_the_split(monkeypatch, tmp_path, capsys):
    engine = tiny_engine(budget=8, offload=True, layers=3)
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    report = tmp_path / "bench.md"
    assert cli.main(["bench", "--n-prompts", "1", "--max-new-tokens", "6", "--json", "--out", str(report)]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for name in ("edgespec", "plain"):
        split = rows[name]["split"]
        assert list(split["rest"]) == list(REST_PARTS)
        assert sum(split["rest"].values()) == pytest.approx(split["overhead"], abs=1e-3)
        steps = split["draft"] + split["verify"] + split["overhead"]
        assert rows[name]["rest_share"] == pytest.approx(split["overhead"] / steps, rel=1e-2, abs=1e-4)
    assert rows["hf-assisted"]["split"] is None
    text = report.read_text()
    assert "- edgespec time split:" in text and "of the steps: planning" in text and "re-rooting" in text
