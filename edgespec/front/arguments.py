"""The command line's numbers checked before any model loads (edgespec/base/checks.py's rules, so the
CLI, the Python API and the server agree): a limit of 0 is refused, never read as "the default" or "no
limit" (leave the option out for the default); sampling settings are finite and in range; ports are
0-65535 (0: any free port); the server's body limit is at least a KiB.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from edgespec.base import checks
from edgespec.base.errors import EdgespecError, InvalidArgumentError
from edgespec.core.sampling import check_sampling

# what a missing --max-new-tokens means, per command (serve: up to the context window)
MAX_NEW_DEFAULT = {"chat": 512, "generate": 256, "bench": 64}
MIN_BODY_MB = 1 / 1024  # 1 KiB: a smaller body limit refuses every request


def check_args(args: argparse.Namespace) -> None:
    """Raise InvalidArgumentError naming the first option out of range (as `--option`)."""
    try:
        _check(args)
    except InvalidArgumentError as e:
        msg, name = str(e), e.argument or ""
        if name and msg.startswith(name):  # "top_p must be ..." → "--top-p must be ..."
            msg = "--" + name.replace("_", "-") + msg[len(name):]
        raise InvalidArgumentError(msg, e.argument) from None


def _check(args: argparse.Namespace) -> None:
    if getattr(args, "max_new_tokens", None) is not None:
        checks.integer("max_new_tokens", args.max_new_tokens, lo=1,
                       fix=f" (leave it out for the default{_default(args.command)})")
    given = {n: getattr(args, n, None) for n in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    check_sampling(**{"temperature": 0.0, **{n: v for n, v in given.items() if v is not None}})
    for name, lo in (("link_delay", 0.0),):
        if getattr(args, name, None) is not None:
            checks.number(name, getattr(args, name), lo)
    if getattr(args, "draft_temperature", None) is not None:
        checks.number("draft_temperature", args.draft_temperature, 0.0, lo_open=True)
    for name, lo in (("resident_layers", 0), ("n_prompts", 1), ("prompts", 1), ("prefix", 0)):
        if getattr(args, name, None) is not None:
            checks.integer(name, getattr(args, name), lo=lo)
    for name in ("port", "stage_port"):
        if getattr(args, name, None) is not None:
            checks.integer(name, getattr(args, name), 0, 65535, " (0: any free port)")
    if getattr(args, "max_body_mb", None) is not None:
        mb = args.max_body_mb
        if not (math.isfinite(mb) and mb >= MIN_BODY_MB):
            raise InvalidArgumentError(f"max_body_mb must be a finite number of MiB >= {MIN_BODY_MB:.6f} (1 KiB; "
                                       f"the default is 4), got {mb!r}", "max_body_mb")


def _default(command: str) -> str:
    if command == "serve":
        return ": up to the context window"
    return f": {MAX_NEW_DEFAULT[command]}" if command in MAX_NEW_DEFAULT else ""


def max_new_tokens(args: argparse.Namespace) -> int:
    """--max-new-tokens, or the command's default when it is left out."""
    return checks.max_new_tokens(args.max_new_tokens, MAX_NEW_DEFAULT[args.command])


def grammar_file(args: argparse.Namespace):
    """--json-schema FILE / --grammar FILE as a core.grammar.Grammar (None: neither given)."""
    from edgespec.core.grammar import Grammar

    if args.json_schema and args.grammar:
        raise EdgespecError("give --json-schema or --grammar, not both")
    path = args.json_schema or args.grammar
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgespecError(f"cannot read {path}: {e}") from None
    grammar = Grammar.json_schema(text) if args.json_schema else Grammar.lark(text)
    grammar.checked()  # a bad file is refused before minutes of model loading, not after
    return grammar
