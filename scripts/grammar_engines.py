"""Which grammar engine edgespec's constraints use: llguidance, xgrammar and outlines-core side by side on
the embedded default's tokenizer (SmolLM2, 49,152 tokens).

For each engine: which JSON-schema features compile (and whether an unsupported one is refused rather
than ignored), the time to compile a pydantic-style schema, the time to compute one next-token mask
(walking a valid document token by token), and the time to fork a matcher state (a tree node branching).

    pip install xgrammar==0.2.9 outlines-core==0.2.14   # the two compared with llguidance (edgespec's)
    python scripts/grammar_engines.py                   # benchmarks/grammar_engines_cpu.md
"""
from __future__ import annotations

import json
import statistics
import time

from edgespec.loading.models import load_tokenizer

SCHEMA = {  # a pydantic model's schema, as model_json_schema() writes it (nested, $defs, enum, optional)
    "$defs": {"Address": {"properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                         "zip": {"pattern": "^[0-9]{5}$", "type": "string"}},
                          "required": ["street", "city", "zip"], "type": "object"}},
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                   "email": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                   "role": {"enum": ["admin", "user", "guest"], "type": "string"},
                   "tags": {"items": {"type": "string"}, "type": "array", "maxItems": 5},
                   "address": {"$ref": "#/$defs/Address"}},
    "required": ["name", "age", "role", "tags", "address"], "type": "object", "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": None, "role": "admin", "tags": ["math", "engines"],
       "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"}}
FEATURES = {  # name: (schema, a valid document, documents that break it)
    "recursive $ref": ({"$defs": {"N": {"type": "object", "properties": {"kids": {"type": "array",
                        "items": {"$ref": "#/$defs/N"}}}, "additionalProperties": False}}, "$ref": "#/$defs/N"},
                       {"kids": [{"kids": [{"kids": []}]}]}, [{"kids": [1]}]),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, 3, [True]),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "string"}}}]}, {"a": 1, "b": "x"}, [{"a": 1, "b": 2}]),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", ["yesterday"]),
    "number bounds": ({"type": "number", "minimum": 1.5, "exclusiveMaximum": 10}, 2, [10, 1]),
    "integer minimum": ({"type": "integer", "minimum": 0}, 7, [-1]),
    "string maxLength": ({"type": "string", "maxLength": 3}, "abc", ["abcd"]),
    "string pattern": ({"type": "string", "pattern": "^[0-9]{3}$"}, "123", ["12a"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
                          [1, 2], [[1], [1, 2, 3, 4]]),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, [{"a": 1, "z": 2}]),
    "const": ({"const": "yes"}, "yes", ["no"]),
    "patternProperties": ({"type": "object", "patternProperties": {"^x-": {"type": "integer"}},
                           "additionalProperties": False}, {"x-a": 1}, [{"x-a": "s"}]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [[1, 1]]),
}


def verdict(accepts, valid, invalid) -> str:
    """A feature's row: "ok" when the valid document passes and every invalid one is stopped."""
    if not accepts(valid):
        return "rejects a valid document"
    wrong = [d for d in invalid if accepts(d)]
    return f"ignored: accepts {json.dumps(wrong[0])}" if wrong else "ok"


def timed(fn, n=1):
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    return (time.perf_counter() - t) / n, out


def doc_tokens(tok) -> list[int]:
    return tok.encode(json.dumps(DOC), add_special_tokens=False)


# ---- llguidance ----------------------------------------------------------------------------------
def llg(tok):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    setup, lltok = timed(lambda: llguidance.hf.from_tokenizer(tok))
    compile_s, m = timed(lambda: llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)))
    assert not m.is_error(), m.get_error()
    mask = lt.allocate_token_bitmask(1, lltok.vocab_size)
    times, forks = [], []
    for t in doc_tokens(tok):
        dt, _ = timed(lambda: lt.fill_next_token_bitmask(m, mask))
        times.append(dt)
        forks.append(timed(m.deep_copy)[0])
        assert m.consume_token(t), m.get_error()
    features = {}
    for name, (schema, valid, invalid) in FEATURES.items():
        g = llguidance.LLMatcher.grammar_from_json_schema(schema)
        err = llguidance.LLMatcher.validate_grammar(g, lltok)
        if err:
            features[name] = "refused: " + err.splitlines()[0][:70]
            continue

        def accepts(doc, g=g):
            m = llguidance.LLMatcher(lltok, g)
            return m.consume_tokens(tok.encode(json.dumps(doc), add_special_tokens=False)) and m.is_accepting()
        features[name] = verdict(accepts, valid, invalid)
    return setup, compile_s, times, forks, features


# ---- xgrammar ------------------------------------------------------------------------------------
def xgr(tok):
    import xgrammar

    setup, info = timed(lambda: xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    compile_s, compiled = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    m = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    times, forks = [], []
    for t in doc_tokens(tok):
        times.append(timed(lambda: m.fill_next_token_bitmask(mask))[0])
        forks.append(timed(m.fork)[0])
        assert m.accept_token(t)
    features = {}
    for name, (schema, valid, invalid) in FEATURES.items():
        try:
            c = compiler.compile_json_schema(json.dumps(schema))
        except Exception as e:  # noqa: BLE001 - reported as a row
            features[name] = "refused: " + str(e).splitlines()[0][:70]
            continue

        def accepts(doc, c=c):
            m = xgrammar.GrammarMatcher(c)
            ok = all(m.accept_token(t) for t in tok.encode(json.dumps(doc), add_special_tokens=False))
            return ok and m.accept_token(tok.eos_token_id)
        features[name] = verdict(accepts, valid, invalid)
    return setup, compile_s, times, forks, features


# ---- outlines-core -------------------------------------------------------------------------------
def outlines(tok):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    setup, vocab = timed(lambda: oc.Vocabulary.from_pretrained_tokenizer(tok) if hasattr(
        oc.Vocabulary, "from_pretrained_tokenizer") else _oc_vocab(oc, tok))
    compile_s, index = timed(lambda: oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    guide = oc.Guide(index)
    import torch

    mask = torch.zeros((len(tok) + 31) // 32, dtype=torch.int32)
    times, forks = [], []
    for t in doc_tokens(tok):
        times.append(timed(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4))[0])
        forks.append(timed(guide.get_state)[0])  # a state is an int: forking is keeping it
        guide.advance(t)
    features = {}
    for name, (schema, valid, invalid) in FEATURES.items():
        try:
            index = oc.Index(build_regex_from_schema(json.dumps(schema)), vocab)
        except Exception as e:  # noqa: BLE001 - reported as a row
            features[name] = "refused: " + str(e).splitlines()[0][:70]
            continue

        def accepts(doc, index=index):
            g = oc.Guide(index)
            try:
                for t in tok.encode(json.dumps(doc), add_special_tokens=False):
                    g.advance(t)
            except ValueError:
                return False
            return tok.eos_token_id in g.get_tokens()
        features[name] = verdict(accepts, valid, invalid)
    return setup, compile_s, times, forks, features


def _oc_vocab(oc, tok):
    eos = tok.eos_token_id
    table: dict[str, list[int]] = {}
    for piece, i in tok.get_vocab().items():  # outlines-core wants each token's text, not its byte-level form
        if i != eos:
            table.setdefault(tok.convert_tokens_to_string([piece]), []).append(i)
    return oc.Vocabulary(eos, table)


def main() -> None:
    tok = load_tokenizer(None)
    print(f"tokenizer: SmolLM2-135M-Instruct, {len(tok)} tokens; document: {len(doc_tokens(tok))} tokens\n")
    rows, feats = [], {}
    for name, fn in (("llguidance", llg), ("xgrammar", xgr), ("outlines-core", outlines)):
        try:
            setup, compile_s, times, forks, features = fn(tok)
        except Exception as e:  # noqa: BLE001 - an engine that fails is a row saying so
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |")
            continue
        med = statistics.median(times) * 1e3
        rows.append(f"| {name} | {setup:.2f} | {compile_s * 1e3:.1f} | {med:.3f} | {max(times) * 1e3:.3f} | "
                    f"{statistics.median(forks) * 1e6:.1f} |")
        feats[name] = features
    print("| engine | tokenizer setup, s | schema compile, ms | mask, ms (median) | mask, ms (max) | fork, us |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n| schema feature | " + " | ".join(feats) + " |")
    print("|---|" + "---|" * len(feats))
    for f in FEATURES:
        print(f"| {f} | " + " | ".join(feats[e][f] for e in feats) + " |")


if __name__ == "__main__":
    main()
