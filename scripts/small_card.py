#!/usr/bin/env python
"""Run an `edgespec` command as on a smaller GPU: every byte of the card beyond `--vram-gb` GiB is taken
by one dummy tensor before the command loads anything.

    python scripts/small_card.py --vram-gb 24 bench --device cuda --target-shape llama-70b --stream-quant nf4 ...

On an H200 (139 GiB) the command then has a 24 GB consumer card: the target keeps as many resident layers
as fit there (the loader's default, resident_layers None) and must run in what is left. On a CPU nothing
is taken (the command runs as it is). Afterwards it prints the command's peak device memory, and adds
the card's size and that peak to the report when the command wrote one (`--out FILE`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgespec.front import cli  # noqa: E402
from edgespec.base.device import hold_beyond  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vram-gb", type=float, required=True, help="GiB of card the command may use")
    args, rest = ap.parse_known_args(argv)
    cuda = torch.cuda.is_available() and _option(rest, "--device") != "cpu"
    dummy = hold_beyond(torch.device("cuda"), args.vram_gb) if cuda else None
    held = dummy.numel() if dummy is not None else 0
    line = (f"card: {args.vram_gb:g} GiB (the rest of the {torch.cuda.get_device_name()} held by a dummy tensor "
            "before loading, scripts/small_card.py)" if cuda else "card: none (CPU run: nothing held)")
    print(f"small_card: {line}", flush=True)
    rc = cli.main(rest)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - held) / 2**30
        line += f"; the command's peak device memory {peak:.1f} GiB"
        print(f"small_card: peak device memory of the command {peak:.1f} GiB of {args.vram_gb:g}", flush=True)
    out = _option(rest, "--out")
    if out and Path(out).is_file():
        with open(out, "a") as f:
            f.write(f"- {line}\n")
    del dummy
    return rc


def _option(argv: list[str], name: str) -> str | None:
    """The value of `name` in `argv` (`--name value` or `--name=value`), or None."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
