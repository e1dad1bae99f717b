"""Prompts: chat messages from a line of text, and MT-Bench first turns for benchmarks and profiles."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from edgespec.base import checks
from edgespec.base.errors import ContextLengthError, InvalidArgumentError, InvalidPromptError

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for staying focused while studying.",
    "What is 17 times 23? Show your work.",
]
ROOT = Path(__file__).resolve().parents[2]  # the repository root of a checkout
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
    if not file.is_file():  # (the default file lives beside a development checkout: not named to users)
        said = f"{file} not found: using" if path else "using"
        print(f"edgespec: {said} {min(n, len(BUILTIN_PROMPTS))} built-in prompts", file=sys.stderr)
        return BUILTIN_PROMPTS[:n], "built-in prompts"
    return read_questions(file, n), _shown(file)


def _shown(file: Path) -> str:
    """The path as seen from the repository root (../shared/...), else as given."""
    try:
        return os.path.relpath(file.resolve(), ROOT)
    except ValueError:
        return str(file)


def encode(tokenizer, prompt, max_context: int, vocab: int | None = None) -> list[int]:
    """A prompt as token ids: a str is tokenized as is, a list of {role, content} messages through the
    tokenizer's chat template, ids (a list or tensor of ints in [0, vocab)) pass through; anything else is
    an InvalidPromptError naming what is wrong (edgespec/base/checks.py). Refuses an empty prompt, and
    one the context window cannot hold with room to answer."""
    kind = checks.prompt_kind(prompt)
    if kind == "text":
        ids = _needs(tokenizer).encode(checks.text(prompt, "prompt")) if prompt else []
    elif kind == "messages":
        ids = _needs(tokenizer).apply_chat_template(checks.messages(prompt), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
    else:
        flat = prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt
        ids = checks.token_ids(flat, vocab)
    if not ids:
        raise InvalidPromptError("The prompt is empty: give at least one token of text.", "prompt")
    if len(ids) >= max_context:
        raise ContextLengthError(f"The prompt has {len(ids)} tokens but the context window is {max_context}: "
                                 "shorten the prompt (or, in chat, /reset the conversation).")
    return ids


def _needs(tokenizer):
    if tokenizer is None:
        raise InvalidArgumentError("This engine has no tokenizer: pass token ids, or give Engine a tokenizer.")
    return tokenizer
