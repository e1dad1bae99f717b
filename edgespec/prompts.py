"""Prompts: chat messages from a line of text, and MT-Bench first turns for benchmarks and profiles."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for staying focused while studying.",
    "What is 17 times 23? Show your work.",
]
ROOT = Path(__file__).resolve().parents[1]  # the repository root of a checkout
KEPT = ROOT / "tests" / "data" / "mt_bench_first5.jsonl"  # five MT-Bench questions kept in the repository


def chat_messages(text: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": text}]


def default_questions() -> Path:
    """../shared/data/mt_bench_questions.jsonl, relative to the repository root."""
    return ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"


def read_questions(path: str | os.PathLike, n: int | None = None) -> list[str]:
    """The first turns of the first `n` questions (all when None) of an MT-Bench .jsonl file."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [json.loads(ln)["turns"][0] for ln in lines[:n]]


def load_prompts(n: int, path: str | None = None) -> tuple[list[str], str]:
    """The first turns of the first `n` questions, and where they came from (built-in prompts when
    the file is missing, saying so)."""
    file = Path(path) if path else default_questions()
    if not file.is_file():
        print(f"edgespec: {file} not found: using {min(n, len(BUILTIN_PROMPTS))} built-in prompts", file=sys.stderr)
        return BUILTIN_PROMPTS[:n], "built-in prompts"
    return read_questions(file, n), _shown(file)


def _shown(file: Path) -> str:
    """The path as seen from the repository root (../shared/...), else as given."""
    try:
        return os.path.relpath(file.resolve(), ROOT)
    except ValueError:
        return str(file)
