#!/usr/bin/env python
"""What a GPU run stands on (scripts/gpu_figures.sh and scripts/gpu_check.sh print it first): python, torch,
transformers, edgespec and the packages the run needs, with their versions; it exits naming whatever is
missing (a package, CUDA on a GPU run, the embedded model where a step needs it).

    python scripts/gpu_env.py DEVICE PACKAGES [--model] [--script NAME]   # PACKAGES: a comma list
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgespec  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("device")
    ap.add_argument("packages")
    ap.add_argument("--model", action="store_true", help="the steps need the embedded model")
    ap.add_argument("--script", default="scripts/gpu_figures.sh", help="whose header says how to carry them")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"edgespec {edgespec.__version__} ({edgespec.__file__})")
    missing = []
    for name in args.packages.split(","):
        try:
            module = importlib.import_module(name)
            print(f"{name} {importlib.metadata.version(name)} ({module.__file__})")
        except Exception as err:  # noqa: BLE001
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if args.device != "cpu" and not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    if "triton" in args.packages.split(","):
        from edgespec.offload import kernels

        print(f"decode kernels: {'available' if kernels.available() else kernels.unavailable_reason()}")
    if missing:
        sys.exit("missing: " + "; ".join(missing) + f" (carry them: see the header of {args.script})")
    if args.model:
        from edgespec.loading.resolve import embedded_gguf

        print(f"embedded model: {embedded_gguf(fetch=False)}")
    else:
        print("embedded model: not needed by these steps")


if __name__ == "__main__":
    main()
