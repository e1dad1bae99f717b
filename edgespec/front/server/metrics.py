"""What the server has done, in Prometheus' text exposition format (GET /metrics).

The generation worker records each run (from its RunStats), the HTTP side the requests it rejects
before queueing; /metrics renders a snapshot under the same lock.
"""
from __future__ import annotations

import threading

TREE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COUNTERS = {  # name: help
    "prompt_tokens_total": "Prompt tokens of the requests answered.",
    "completion_tokens_total": "Tokens generated (accepted by the target).",
    "target_passes_total": "Target verification passes (one per step).",
    "draft_tokens_total": "Draft tokens the target verified (tree nodes, roots excluded).",
    "generation_seconds_total": "Wall time spent generating.",
}
GAUGES = {  # name: help
    "tokens_per_second": "Tokens per second of the last answer.",
    "accepted_tokens_per_pass": "Tokens accepted per target pass in the last answer.",
    "mean_tree_size": "Mean draft tree size (tokens verified per pass) in the last answer.",
    "scheduler_budget": "Tree budget the scheduler chose last.",
}


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {"ok": 0, "cancelled": 0, "error": 0, "rejected": 0}
        self.counters = dict.fromkeys(COUNTERS, 0.0)
        self.gauges = dict.fromkeys(GAUGES, 0.0)
        self.tree_counts = [0] * (len(TREE_BUCKETS) + 1)  # per bucket (+Inf last), not cumulative
        self.tree_sum = 0
        self.pass_seconds = [0.0, 0]  # sum, count
        self.draft_seconds = [0.0, 0]

    def finished(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, prompt_tokens: int, stats, scheduler: dict) -> None:
        """One finished run: its RunStats (edgespec.base.stats) and the scheduler's stats() after it."""
        steps = stats.steps
        with self._lock:
            c = self.counters
            c["prompt_tokens_total"] += prompt_tokens
            c["completion_tokens_total"] += stats.new_tokens
            c["target_passes_total"] += len(steps)
            c["draft_tokens_total"] += sum(s.tree_size for s in steps)
            c["generation_seconds_total"] += stats.wall_time
            for s in steps:
                self.tree_counts[_bucket(s.tree_size)] += 1
                self.tree_sum += s.tree_size
                self.pass_seconds[0] += s.verify_time
                self.pass_seconds[1] += 1
                self.draft_seconds[0] += s.draft_time
                self.draft_seconds[1] += 1
            g = self.gauges
            g["tokens_per_second"] = stats.tokens_per_second
            g["accepted_tokens_per_pass"] = stats.accepted_per_pass
            g["mean_tree_size"] = sum(s.tree_size for s in steps) / len(steps) if steps else 0.0
            if scheduler.get("budget") is not None:
                g["scheduler_budget"] = scheduler["budget"]

    def render(self, queue_length: int, busy: bool) -> str:
        with self._lock:
            outcomes = [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.requests.items())]
            lines = _family("requests_total", "counter",
                            "Requests finished, by outcome (rejected: bad input caught before queueing).", outcomes)
            for name, text in COUNTERS.items():
                lines += _family(name, "counter", text, [("", self.counters[name])])
            for name, text in GAUGES.items():
                lines += _family(name, "gauge", text, [("", self.gauges[name])])
            lines += self._tree_histogram()
            lines += _family("pass_seconds", "summary", "Target pass time (streaming included), per pass.",
                             [("_sum", self.pass_seconds[0]), ("_count", self.pass_seconds[1])])
            lines += _family("draft_seconds", "summary", "Time spent building each draft tree, per pass.",
                             [("_sum", self.draft_seconds[0]), ("_count", self.draft_seconds[1])])
        lines += _family("queue_length", "gauge", "Requests waiting for the engine.", [("", queue_length)])
        lines += _family("busy", "gauge", "1 while the engine is generating.", [("", int(busy))])
        return "\n".join(lines) + "\n"

    def _tree_histogram(self) -> list[str]:
        samples, total = [], 0
        for edge, count in zip(TREE_BUCKETS + ("+Inf",), self.tree_counts):
            total += count
            samples.append((f'_bucket{{le="{edge}"}}', total))
        samples += [("_sum", self.tree_sum), ("_count", total)]
        return _family("tree_size", "histogram", "Draft tokens verified per target pass.", samples)


def _bucket(size: int) -> int:
    for i, edge in enumerate(TREE_BUCKETS):
        if size <= edge:
            return i
    return len(TREE_BUCKETS)


def _family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> list[str]:
    """# HELP / # TYPE lines and the samples (each key extends the name: labels, _sum, _bucket{...})."""
    full = f"edgespec_{name}"
    out = [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
    for key, value in samples:
        out.append(f"{full}{key} {_number(value)}")
    return out


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
