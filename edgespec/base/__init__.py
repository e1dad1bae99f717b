"""The base: what every wing may use and which imports nothing of edgespec's.

`errors` (the EdgespecError family), `checks` (arguments checked one way for the API, CLI and server), `device` (devices, dtypes, streams, synchronisation), `files` (the
cache folder, atomic writes), `quiet` (third-party noise filtered), `stats` (Plan, StepStats, RunStats),
`config` (DraftConfig, LoadConfig, a model's text config), `memory` (how many bytes a pass needs and
how many are free), `costs` (a machine's measured step costs, as a cost file) and `clock` (whose seconds
the steps record: the wall clock's, or a cost file's replayed).

May import: nothing of edgespec (tests/test_imports.py).
"""

VERSION = "0.1.0"  # edgespec.__version__, pyproject.toml's version
