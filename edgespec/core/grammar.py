"""Grammar constraints: what the target may write (a JSON schema, any JSON object, a regex, a Lark grammar),
as a mask over the vocabulary at every tree node, from that node's own grammar state.

`Grammar` is what the user asked for; `Constraint` is it compiled for one tokenizer and vocabulary (the
grammar engine's token table built once per tokenizer); a `GrammarState` is where a sequence of tokens
left the grammar: its `allowed()` tokens are the next ones that keep the text in the grammar. A state
forks (a tree node's children each continue their parent's state) and advances by one token, so a
tree's states share their paths: a node's state is its parent's, forked, plus its own token — never a
re-parse from the start.

The end of sequence: the mask allows the model's end tokens exactly when the grammar accepts the text
so far, and a grammar that can go no further (a JSON value closed) allows only them, so a constrained
answer ends either complete or at max_tokens (then its stop reason says "length": partial, not valid).

The engine is llguidance (Microsoft's, the engine llama.cpp and vLLM offer): of the three checked
(scripts/grammar_engines.py, benchmarks/grammar_engines_cpu.md) it is the one that enforces every JSON
schema keyword it accepts and refuses the ones it does not implement (xgrammar ignored uniqueItems and
an allOf branch; outlines-core ignored number bounds), its matcher forks (deep_copy) and rolls back,
and one mask costs ~20-30 us on SmolLM2's 49,152 tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from edgespec.base.errors import GrammarError

KINDS = ("json_schema", "json_object", "regex", "lark")
# JSON between tokens: up to 20 whitespace characters (pretty-printed JSON fits; a model that would pad
# forever cannot). A schema's "x-guidance" key sets llguidance's JSON options instead, e.g.
# {"whitespace_flexible": false} for compact JSON only.
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,20}"}


@dataclass(frozen=True)
class Grammar:
    """A constraint on the answer. `kind`: one of KINDS; `source`: the schema as JSON text, the regex, or
    the Lark grammar ("" for json_object). Build one with the class methods."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}: use one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """A JSON schema: a dict, its JSON text, or a pydantic model class (its model_json_schema())."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e.msg} at line {e.lineno} column "
                                   f"{e.colno}: fix the schema text") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        # the keys keep their order: the engine writes an object's properties in the schema's order (as
        # OpenAI's structured outputs do), which is the order the prompt's schema shows the model
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's JSON mode)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        """A Lark grammar (llguidance's dialect: `start: ...`, /regex/ terminals, %json{...} schemas)."""
        return cls("lark", text)

    def engine_text(self) -> str:
        """The grammar as llguidance's grammar text."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            schema = json.loads(self.source)
            said = schema.get("x-guidance", {}) if isinstance(schema, dict) else {}
            spaces = {} if {"whitespace_flexible", "whitespace_pattern"} & set(said) else JSON_OPTIONS
            return LLMatcher.grammar_from_json_schema(schema, defaults=spaces)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)

    def describe(self) -> str:
        return {"json_schema": "a JSON schema", "json_object": "any JSON object", "regex": "a regex",
                "lark": "a Lark grammar"}[self.kind]

    def checked(self, table=None) -> str:
        """The engine's grammar text, compiled and checked (against `table`, llguidance's token table, or
        against no tokenizer: before any model is loaded). A schema keyword the engine does not implement,
        a regex or Lark grammar that does not parse: a GrammarError naming the problem."""
        from llguidance import LLMatcher

        try:
            text = self.engine_text()
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{self.describe()} could not be read: {e}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(text, table)
        if is_error:
            raise GrammarError(f"{self.describe()} cannot be compiled: {_first_lines(messages[0])}; "
                               "fix it or leave out what the message names")
        return text


def as_grammar(value) -> Grammar | None:
    """What `grammar=` takes: a Grammar, a JSON schema (dict) or a pydantic model class; None: none."""
    if value is None or isinstance(value, Grammar):
        return value
    if isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema")):
        return Grammar.json_schema(value)
    raise GrammarError(f"grammar must be a Grammar, a JSON schema (dict) or a pydantic model class, got "
                       f"{type(value).__name__}: build one with Grammar.json_schema / regex / lark")


# ---- compiled ------------------------------------------------------------------------------------
_TABLES: dict[tuple, tuple] = {}  # (id(tokenizer), vocab, eos ids) -> (tokenizer, llguidance token table)


def token_table(tokenizer, vocab: int, eos_ids) -> object:
    """llguidance's view of `tokenizer` (each token's bytes), `vocab` rows wide, ending on `eos_ids`; built
    once per tokenizer (about a second for a 150k vocabulary)."""
    eos = sorted(int(e) for e in eos_ids)
    key = (id(tokenizer), vocab, tuple(eos))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    import llguidance.hf

    if not eos:
        raise GrammarError("the model has no end-of-sequence token, so a constrained answer could never end: "
                           "give the tokenizer an eos_token")
    try:
        table = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    except Exception as e:  # noqa: BLE001 - the engine's own message, named
        raise GrammarError(f"this tokenizer cannot be used for grammar constraints ({type(e).__name__}: {e}); "
                           "constraints need a fast (Rust) Hugging Face tokenizer") from None
    _TABLES[key] = (tokenizer, table)
    return table


class Constraint:
    """`grammar` compiled against a token table (token_table): `start()` gives the state before the
    answer's first token. Compiling checks the grammar: a schema keyword the engine does not implement,
    a regex or Lark grammar that does not parse, are a GrammarError naming the problem."""

    def __init__(self, grammar: Grammar, table, vocab: int):
        from llguidance import LLMatcher

        self.grammar, self.table, self.vocab = grammar, table, vocab
        self.text = grammar.checked(table)
        self._start = LLMatcher(table, self.text, log_level=0)
        if self._start.is_error():
            raise GrammarError(f"{grammar.describe()} cannot be compiled: {_first_lines(self._start.get_error())}")

    def start(self) -> "GrammarState":
        return GrammarState(self._start.deep_copy(), self.vocab)


def _first_lines(msg: str, n: int = 3) -> str:
    return " ".join(line.strip() for line in msg.strip().splitlines()[:n])


class GrammarState:
    """Where a sequence of tokens left the grammar (an llguidance matcher)."""

    __slots__ = ("matcher", "vocab")

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def fork(self) -> "GrammarState":
        return GrammarState(self.matcher.deep_copy(), self.vocab)

    def advance(self, token: int) -> None:
        """Take `token` (one the mask allowed; anything else is a bug, raised)."""
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"token {token} is outside the grammar here: {self.matcher.get_error()}")

    def then(self, token: int) -> "GrammarState":
        """A new state: this one followed by `token`."""
        nxt = self.fork()
        nxt.advance(token)
        return nxt

    def extend(self, tokens) -> None:
        for t in tokens:
            self.advance(t)

    @property
    def accepting(self) -> bool:
        """The text so far is a complete answer (the end of sequence is allowed)."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing but the end of sequence may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that may come next."""
        return allowed_rows([self])[0]


def allowed_rows(states: list[GrammarState]) -> torch.Tensor:
    """(len(states), vocab) bool: each state's next allowed tokens (one bitmask pass for all)."""
    import llguidance.torch as lt

    vocab = states[0].vocab
    bits = lt.allocate_token_bitmask(len(states), vocab)
    for i, state in enumerate(states):
        lt.fill_next_token_bitmask(state.matcher, bits, i)
    return unpack(bits, vocab)


_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()  # byte → its 8 bits, lowest first


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, ceil(V/32)) int32 bitmask (bit j of word w: token 32 w + j) → (n, V) bool, a byte at a time
    through a table (~3x faster than shifting each word 32 ways; the bytes of an int32 come lowest first
    on the little-endian machines torch runs on, checked in tests/test_grammar.py)."""
    by = bits.contiguous().view(torch.uint8).reshape(-1).int()
    return _BYTE_BITS.to(by.device).index_select(0, by).reshape(bits.shape[0], -1)[:, :vocab]  # the table follows


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """`logits` (..., V) with every token `allowed` (..., W) forbids at -inf (None: unchanged); ids past
    W are forbidden, and `allowed` past V ignored (a drafter's logits may stop at the shared vocabulary)."""
    if allowed is None:
        return logits
    v, w = logits.shape[-1], allowed.shape[-1]
    if w != v:
        allowed = allowed[..., :v] if w > v else torch.nn.functional.pad(allowed, (0, v - w), value=False)
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
