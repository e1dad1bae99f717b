"""The cost-replay options of `edgespec bench` and `edgespec profile`: `--costs FILE` charges a cost
file's seconds (a machine's measured step costs, edgespec/base/costs.py) instead of this machine's wall
time, while the real models run here and decide every token; `--write-costs FILE` writes the costs a
run measured, for a later replay."""
from __future__ import annotations

import argparse
import sys

from edgespec.base.clock import Clock, ReplayClock, WallClock
from edgespec.base.costs import Costs


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--costs", metavar="FILE", default=None,
                   help="replay this cost file's seconds (pass vs tree tokens, drafting per forward, per-step rest; "
                        "e.g. benchmarks/costs/h200-8b.json) instead of this machine's wall time")
    p.add_argument("--write-costs", metavar="FILE", default=None,
                   help="write the step costs this run measured as a cost file (for --costs)")


def clock_for(args: argparse.Namespace) -> Clock:
    """A ReplayClock over --costs when given (a bad file is refused before any model loads), else the wall clock."""
    path = getattr(args, "costs", None)
    return ReplayClock(path) if path else WallClock()


def write_costs(args: argparse.Namespace, steps, source: str) -> None:
    """Write the steps' measured costs to --write-costs (nothing when it is not given)."""
    path = getattr(args, "write_costs", None)
    if not path:
        return
    Costs.from_steps(steps, source).save(path)
    print(f"edgespec: wrote the measured step costs to {path}", file=sys.stderr)
