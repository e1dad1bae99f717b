"""The cost-replay clock: a cost file's seconds instead of this machine's, the real models still
deciding every token (edgespec/base/clock.py, edgespec/base/costs.py)."""
from __future__ import annotations

import json

import pytest

from edgespec import Engine
from edgespec.base.clock import ReplayClock, WallClock
from edgespec.base.costs import Costs
from edgespec.base.errors import InvalidArgumentError
from edgespec.front import cli, replay
from tests.conftest import greedy_reference, noisy_copy, prompts, tiny_model, tiny_tokenizer

GPU_LIKE = {"version": 1, "source": "made up", "pass": [[1, 0.30], [256, 0.34], [1024, 0.50]],
            "draft": {"per_forward": 0.004, "per_token": 1e-5}, "rest": 0.005}


def pair(link_delay: float = 0.0, **engine_kw):
    """The tiny peaked target (offloaded, with an emulated link) and a close copy drafting."""
    from edgespec.offload import offload_layers

    target = tiny_model("llama", init=0.5, layers=3)
    drafter = noisy_copy(target, scale=0.002)
    reference = tiny_model("llama", init=0.5, layers=3)  # the same weights, not streamed
    offload_layers(target, "cpu", resident_layers=0, link_delay=link_delay, progress=False)
    return Engine(target, drafter, tiny_tokenizer(), **engine_kw), reference


def test_replaying_a_runs_own_costs_gives_its_tokens_per_second():
    """Acceptance 1a: the costs a run measured (CPU, emulated link), replayed over the same run's steps,
    give its measured tokens/s within 5 % (same run: no second, differently busy, measurement)."""
    engine, _ = pair(link_delay=0.01, budget=8)  # 3 streamed layers x 10 ms: the link dominates the pass
    runs = [engine.generate(p, max_new_tokens=20).stats for p in prompts(3)]
    steps = [s for r in runs for s in r.steps]
    clock = ReplayClock(Costs.from_steps(steps))
    measured = sum(r.new_tokens for r in runs) / sum(r.wall_time for r in runs)
    replayed = sum(r.new_tokens for r in runs) / clock.replay_steps(steps)
    assert replayed == pytest.approx(measured, rel=0.05)
    assert any(s.draft_forwards > 1 for s in steps) and any(s.overlap_time > 0 for s in steps)  # overlap on
    # the same prompts run again with the clock in the engine (what the scheduler and bench see): the
    # drafting during the pass is then the replayed pass's, the tokens/s still the measured run's
    again, _ = pair(budget=8, overlap=True, clock=clock)
    assert again.overlap and engine.overlap
    reruns = [again.generate(p, max_new_tokens=20).stats for p in prompts(3)]
    assert [r.new_tokens for r in reruns] == [r.new_tokens for r in runs]
    rerun = sum(r.new_tokens for r in reruns) / sum(r.wall_time for r in reruns)
    assert rerun == pytest.approx(measured, rel=0.05)


def test_a_replayed_run_is_lossless_and_the_same_on_any_machine():
    """Under a replay clock the seconds depend on the work alone: two engines give the same step times,
    budgets and run time to the last bit, and the tokens are still the target's own greedy ones."""
    costs = Costs.from_dict(GPU_LIKE)
    results = []
    for _ in range(2):
        engine, reference = pair(budget="auto", calibrate=True, overlap=True, clock=ReplayClock(costs))
        outs = [engine.generate(p, max_new_tokens=16) for p in prompts(2)]
        for p, out in zip(prompts(2), outs):
            assert out.ids == greedy_reference(reference, p, 16)
            assert out.stats.wall_time == pytest.approx(sum(s.step_time for s in out.stats.steps), rel=1e-12)
        results.append([(s.budget, s.draft_time, s.verify_time, s.overhead_time, s.overlap_time)
                        for o in outs for s in o.stats.steps])
        assert engine.scheduler.cost.pass_time(1) == pytest.approx(0.30)  # calibrated from the file
    assert results[0] == results[1]
    steps = results[0]
    assert all(o == pytest.approx(0.005) for _, _, _, o, _ in steps)
    assert any(ov > 0 for *_, ov in steps) and all(ov <= v + 0.02 for _, _, v, _, ov in steps)  # during the pass
    assert max(b for b, *_ in steps) > 8  # a 300 ms pass and 4 ms forwards: the scheduler drafts big trees


def test_costs_interpolate_and_refuse_bad_files(tmp_path):
    costs = Costs.from_dict(GPU_LIKE)
    assert costs.pass_time(1) == pytest.approx(0.30) and costs.pass_time(0) == pytest.approx(0.30)
    assert costs.pass_time(128.5) == pytest.approx(0.32)
    assert costs.pass_time(2048) == pytest.approx(0.50 + 0.16 * 1024 / 768)  # past the last point: its slope
    assert costs.draft_time(10, 300) == pytest.approx(0.043)
    path = tmp_path / "c.json"
    costs.save(path)
    assert Costs.load(path).to_dict() == Costs.from_dict(GPU_LIKE).to_dict()
    for bad in ({"pass": []}, {**GPU_LIKE, "rest": -1}, {**GPU_LIKE, "pass": [[1, 0.1], [1, 0.2]]}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidArgumentError, match="--costs"):
            Costs.load(path)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        Costs.load(tmp_path / "missing.json")


def test_costs_from_steps_fit_the_drafting_per_forward_and_per_token():
    from edgespec.base.stats import StepStats

    steps = [StepStats(8, 8, 3, 2, 0.01 * f + 0.001 * t, 0.2, 9, draft_forwards=f, draft_fed=t, overhead_time=0.003)
             for f, t in [(1, 1), (3, 60), (5, 100), (2, 9)]]
    costs = Costs.from_steps(steps)
    assert costs.per_forward == pytest.approx(0.01) and costs.per_token == pytest.approx(0.001)
    assert costs.rest == pytest.approx(0.003) and costs.pass_time(9) == pytest.approx(0.2)
    assert WallClock().draft(0.5, 3, 9) == 0.5 and ReplayClock(costs).draft(0.5, 3, 9) == pytest.approx(0.039)


def test_bench_writes_costs_and_replays_them(monkeypatch, tmp_path, capsys):
    """`edgespec bench --write-costs F` then `--costs F`: the replayed rows (edgespec, plain; HF assisted
    has no replayed seconds) with the same tokens, their seconds the file's."""
    made = []

    def make(args):
        made.append(pair(link_delay=0.005, budget=8, clock=replay.clock_for(args))[0])
        return made[-1]

    monkeypatch.setattr(cli, "make_engine", make)
    costs = tmp_path / "costs.json"
    argv = ["bench", "--n-prompts", "2", "--max-new-tokens", "8", "--json"]
    assert cli.main(argv + ["--write-costs", str(costs)]) == 0
    wall = {r["method"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    written = Costs.load(costs)
    assert written.pass_time(1) > 0.01  # 3 layers x 5 ms of emulated link
    assert cli.main(argv + ["--costs", str(costs)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"edgespec", "plain"} and data["clock"].startswith("replayed costs")
    assert made[-1].clock.replay and not made[0].clock.replay
    for name in rows:
        assert rows[name]["new_tokens"] == wall[name]["new_tokens"] and rows[name]["same_output"]
    plain = rows["plain"]  # its seconds: the file's pass times and rest, nothing measured here
    assert plain["split"]["draft"] == 0 and plain["split"]["overhead"] == pytest.approx(plain["passes"] * written.rest, abs=1e-4)
    assert plain["seconds"] == pytest.approx(plain["split"]["verify"] + plain["split"]["overhead"], abs=1e-3)


@pytest.mark.parametrize("command", ["bench", "profile"])
def test_a_bad_cost_file_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, command):
    from edgespec.engine.engine import Engine

    def never(*a, **k):
        raise AssertionError("a model was loaded before --costs was checked")

    monkeypatch.setattr(Engine, "from_pretrained", never)
    bad = tmp_path / "costs.json"
    bad.write_text(json.dumps({"pass": []}))
    for path, match in ((bad, "--costs"), (tmp_path / "missing.json", "cannot read")):
        assert cli.main([command, "--costs", str(path)]) == 2
        assert match in capsys.readouterr().err
