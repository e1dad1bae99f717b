"""Grammar constraints and log-probabilities, exact inside the token trees.

Tiny random targets over the embedded default's real tokenizer (SmolLM2, 49,152 tokens): under a JSON
schema, greedy output equals transformers' `generate` with a logits processor driving the same grammar
engine (llguidance, used directly here, not through edgespec), token for token, at budgets 0, 16 and 256
with and without drafting during the pass; sampling under a regex draws the target's masked
distribution (chi-square over two tokens, the second picked at an accepted tree node); every finished
output validates against its schema; log-probabilities equal those of the target's own logits.
"""
from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.torch as lt
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper

from edgespec import Engine
from edgespec.base.errors import GrammarError, InvalidArgumentError
from edgespec.base.stats import Plan
from edgespec.core.grammar import Constraint, Grammar, token_table
from tests.conftest import Fixed, chi2, chi2_critical, noisy_copy, tiny_model

V = 49152
EOS = 2  # SmolLM2's <|im_end|>
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n", "colour"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "colour": {"enum": ["red", "green", "blue"]}}}
COMPACT = {**SCHEMA, "x-guidance": {"whitespace_flexible": False}}  # a random model finishes it soon
NESTED = {"type": "object", "required": ["items"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False},
          "properties": {"items": {"type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/Item"}}},
          "$defs": {"Item": {"type": "object", "required": ["id", "tag"], "additionalProperties": False,
                             "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                            "tag": {"enum": ["a", "b"]}}}}}


@pytest.fixture(scope="module")
def tok():
    from edgespec.loading.models import load_tokenizer

    return load_tokenizer(None)


def pair(seed=0, init=0.5, scale=0.02):
    target = tiny_model("llama", seed, vocab=V, init=init)
    target.config.eos_token_id = EOS
    return target, noisy_copy(target, scale=scale)


class Reference(LogitsProcessor):
    """The target's own constrained decoding: llguidance's mask after the tokens generated so far,
    applied as a transformers logits processor (after the penalty, before temperature and top-k/p)."""

    def __init__(self, tok, grammar: Grammar, prompt_len: int):
        table = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=[EOS])
        self.matcher = llguidance.LLMatcher(table, grammar.engine_text())
        self.start, self.done = prompt_len, 0

    def __call__(self, input_ids, scores):
        new = input_ids[0, self.start:].tolist()
        for t in new[self.done:]:
            assert self.matcher.consume_token(t)
        self.done = len(new)
        bits = lt.allocate_token_bitmask(1, V)
        lt.fill_next_token_bitmask(self.matcher, bits)
        allowed = ((bits[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(-1)[:V]
        return scores.masked_fill(~allowed, float("-inf"))


def reference(target, tok, grammar, ids, n, **sampling):
    out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                          pad_token_id=EOS, logits_processor=LogitsProcessorList([Reference(tok, grammar, len(ids))]),
                          **sampling)
    return out[0, len(ids):].tolist()


def engine_for(target, drafter, tok, budget, overlap=False, depth=16, branch=8):
    return Engine(target, drafter, tok, scheduler=Fixed(Plan(budget, depth, branch, 32)), overlap=overlap)


PROMPTS = ["Give me a JSON object:", "The answer, as JSON, is", "user: describe a cat\nassistant:"]


# ---- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 16, 256])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_under_a_schema_equals_masked_generate(tok, budget, overlap):
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, budget, overlap)
    grammar, passes = Grammar.json_schema(SCHEMA), []
    for text in PROMPTS:
        ids = tok.encode(text)
        out = engine.generate(ids, max_new_tokens=40, temperature=0, grammar=grammar)
        assert out.ids == reference(target, tok, grammar, ids, 40), text
        passes.append(out.stats.accepted_per_pass)
    if budget:
        assert max(passes) > 1.5, "the drafter never got a token accepted: the tree is not being used"


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0, 16, 256])
@pytest.mark.parametrize("overlap", [False, True])
def test_embedded_default_under_a_schema_equals_masked_generate(real_pair, budget, overlap):
    """The embedded default (fp32 target, nf4 drafter): greedy under a JSON schema equals the target's own
    masked greedy decoding token for token, the answer validates, and the tree is used."""
    import jsonschema

    target, drafter, tok = real_pair
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
    engine = Engine(target, drafter, tok, scheduler=Fixed(Plan(budget, 16, 8, 32)), overlap=overlap)
    ids = engine.encode([{"role": "user", "content": "Describe a person as JSON with name, age and city."}])
    grammar = Grammar.json_schema(schema)
    out = engine.generate(ids, max_new_tokens=48, temperature=0, grammar=grammar)
    assert out.ids == reference(target, tok, grammar, ids, 48)
    assert out.ids[-1] == EOS, "the answer should end inside 48 tokens"
    jsonschema.validate(json.loads(tok.decode(out.ids[:-1])), schema)
    if budget:
        assert out.stats.accepted_per_pass > 1.5


@pytest.mark.parametrize("schema", [COMPACT, NESTED], ids=["flat", "nested"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_finished_output_validates(tok, schema, temperature):
    target, drafter = pair(init=0.3)
    engine = engine_for(target, drafter, tok, 32)
    grammar, finished = Grammar.json_schema(schema), 0
    for i, text in enumerate(PROMPTS * 2):
        out = engine.generate(tok.encode(text), max_new_tokens=60, temperature=temperature, seed=i,
                              grammar=grammar)
        if out.stats.stop_reason == "eos":
            jsonschema.validate(json.loads(out.text), {k: v for k, v in schema.items() if k != "x-guidance"})
            finished += 1
        else:  # ran out of tokens: an honest "length", and what it has so far is not complete JSON
            assert out.stats.stop_reason == "length"
    assert finished >= 4


def test_forced_tokens_are_certain_nodes(tok, monkeypatch):
    """Where the grammar allows one token (a key, a quote), the tree holds it as a certain node: ranked
    FORCED, scored as its parent (log 1), and still verified as any other (the output is the reference's)."""
    from edgespec.core.scores import FORCED, ScoreCalibration

    trees = []
    real = ScoreCalibration.observe_tree
    monkeypatch.setattr(ScoreCalibration, "observe_tree", lambda self, tree, path: (trees.append(tree),
                                                                                      real(self, tree, path))[1])
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 32)
    grammar, ids = Grammar.json_schema(SCHEMA), tok.encode(PROMPTS[0])
    out = engine.generate(ids, max_new_tokens=40, temperature=0, grammar=grammar)
    assert out.ids == reference(target, tok, grammar, ids, 40)
    forced = 0
    for tree in trees:
        for i in (tree.rank == FORCED).nonzero().squeeze(1).tolist():
            assert tree.scores[i] == tree.scores[int(tree.parents[i])]  # certain: depth for free
            forced += 1
    assert forced >= 5, "a JSON schema forces its keys: the trees should hold forced nodes"


def test_a_finished_grammar_forces_the_end(tok):
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 16)
    out = engine.generate(tok.encode("Say yes:"), max_new_tokens=30, temperature=0, grammar=Grammar.regex("yes|no"))
    assert out.text in ("yes", "no") and out.ids[-1] == EOS and out.stats.stop_reason == "eos"


def test_too_few_tokens_end_with_length_and_partial_text(tok):
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 16)
    out = engine.generate(tok.encode("JSON:"), max_new_tokens=3, temperature=0, grammar=Grammar.json_schema(SCHEMA))
    assert out.stats.stop_reason == "length" and len(out.ids) == 3 and out.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_sampling_under_a_regex_draws_the_masked_distribution(tok):
    """Joint law of the first two tokens under a regex: the second is picked at a depth-1 tree node
    whenever the first was drafted, so a wrong mask or renormalisation there shows up."""
    target, drafter = pair(init=0.08, scale=0.3)
    grammar = Grammar.regex("(cat|dog|cow)( (cat|dog|cow)){3}")
    engine = engine_for(target, drafter, tok, 24, depth=4, branch=6)
    ids = tok.encode("Animals:")
    truth = masked_two_token_law(target, tok, grammar, ids)
    assert len(truth) >= 12 and max(truth.values()) < 0.5, "too peaked a law for the test to mean anything"
    n, counts, deeper = 1200, {}, 0
    for i in range(n):
        out = engine.generate(ids, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=i, grammar=grammar)
        counts[tuple(out.ids)] = counts.get(tuple(out.ids), 0) + 1
        deeper += out.stats.steps[0].accepted > 1
    assert deeper > n // 4, "the second token must often come from an accepted tree node"
    stat, df = chi2(counts, truth, n)
    assert stat < chi2_critical(df), (stat, df)
    unmasked_renorm = {k: v for k, v in masked_two_token_law(target, tok, grammar, ids, uniform=True).items()}
    assert chi2(counts, unmasked_renorm, n)[0] > chi2_critical(df), "power: a uniform law over the grammar is rejected"


def masked_two_token_law(target, tok, grammar, ids, uniform=False):
    """p(a) p(b | a) with each step's logits masked to the grammar and renormalised (uniform: every allowed
    token equally likely instead)."""
    constraint = Constraint(grammar, token_table(tok, V, [EOS]), V)
    start = constraint.start()
    with torch.no_grad():
        first = target(torch.tensor([ids])).logits[0, -1]
        p1 = _masked(first, start.allowed(), uniform)
        firsts = p1.nonzero().squeeze(1).tolist()
        seconds = target(torch.tensor([[*ids, a] for a in firsts])).logits[:, -1]
    law = {}
    for row, a in enumerate(firsts):
        p2 = _masked(seconds[row], start.then(a).allowed(), uniform)
        for b in p2.nonzero().squeeze(1).tolist():
            law[(a, b)] = float(p1[a] * p2[b])
    return law


def _masked(logits, allowed, uniform):
    logits = torch.zeros_like(logits) if uniform else logits
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


# ---- log-probabilities ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.7, "top_k": 20, "seed": 3}])
@pytest.mark.parametrize("constrained", [False, True])
def test_logprobs_are_the_targets_own(tok, sampling, constrained):
    target, drafter = pair(init=0.3)
    engine = engine_for(target, drafter, tok, 16)
    grammar = Grammar.json_schema(COMPACT) if constrained else None
    ids = tok.encode(PROMPTS[0])
    out = engine.generate(ids, max_new_tokens=12, grammar=grammar, logprobs=5, **sampling)
    assert len(out.logprobs) == len(out.ids) and [lp.token for lp in out.logprobs] == out.ids
    with torch.no_grad():
        logits = target(torch.tensor([ids + out.ids])).logits[0, len(ids) - 1:-1]
    proc = Reference(tok, grammar, len(ids)) if constrained else None
    warpers = ([TemperatureLogitsWarper(sampling["temperature"]), TopKLogitsWarper(sampling["top_k"])]
               if sampling["temperature"] else [])
    for i, lp in enumerate(out.logprobs):
        prefix = torch.tensor([ids + out.ids[:i]])
        row = logits[i:i + 1]
        row = proc(prefix, row) if proc is not None else row
        for w in warpers:
            row = w(prefix, row)
        want = torch.log_softmax(row[0], dim=-1)
        assert abs(lp.logprob - float(want[out.ids[i]])) < 1e-4
        top = want.topk(5)
        assert [t for t, _ in lp.top] == [int(t) for t, v in zip(top.indices, top.values) if v > float("-inf")]
        assert all(abs(v - float(want[t])) < 1e-4 for t, v in lp.top)
    plain = engine_for(target, drafter, tok, 0).generate(ids, max_new_tokens=12, grammar=grammar, logprobs=5,
                                                         **sampling)
    assert plain.ids == out.ids
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(plain.logprobs, out.logprobs))


def test_logprobs_out_of_range_is_refused(tok):
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 0)
    for bad in (-1, 21, True):
        with pytest.raises(InvalidArgumentError, match="logprobs"):
            engine.generate("hi", max_new_tokens=2, logprobs=bad)


# ---- the grammar itself --------------------------------------------------------------------------
@pytest.mark.parametrize("grammar,match", [
    (lambda: Grammar.json_schema({"type": "strin"}), "cannot be compiled.*strin"),
    (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (lambda: Grammar.json_schema('{"type": "object",'), "not valid JSON"),
    (lambda: Grammar.json_schema(["a list"]), "must be a JSON object"),
    (lambda: Grammar.regex("[a-"), "regex cannot be compiled"),
    (lambda: Grammar.lark("start: missing_rule"), "Lark grammar cannot be compiled.*missing_rule"),
    (lambda: Grammar("xml"), "unknown grammar kind"),
])
def test_bad_grammars_are_clear_errors(tok, grammar, match):
    with pytest.raises(GrammarError, match=match):
        Constraint(grammar(), token_table(tok, V, [EOS]), V)


def test_engine_refuses_a_bad_grammar_and_keeps_working(tok):
    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 16)
    with pytest.raises(GrammarError):
        engine.generate("hi", max_new_tokens=4, grammar={"type": "strin"})
    with pytest.raises(GrammarError, match="grammar must be"):
        engine.generate("hi", max_new_tokens=4, grammar=42)
    ids = tok.encode(PROMPTS[0])
    out = engine.generate(ids, max_new_tokens=20, temperature=0, grammar=SCHEMA)
    assert out.ids == reference(target, tok, Grammar.json_schema(SCHEMA), ids, 20)


def test_states_fork_and_share_paths(tok):
    constraint = Constraint(Grammar.regex("ab(c|d)"), token_table(tok, V, [EOS]), V)
    root = constraint.start()
    a = tok.convert_tokens_to_ids("a")
    b = tok.convert_tokens_to_ids("b")
    left = root.then(a)
    assert not root.allowed()[b] and left.allowed()[b]  # the fork left the root as it was
    after = left.then(b)
    c = tok.convert_tokens_to_ids("c")
    assert after.allowed()[c] and not after.accepting
    done = after.then(c)
    assert done.accepting and done.finished and done.allowed().nonzero().squeeze(1).tolist() == [EOS]


def test_pydantic_model_as_grammar(tok):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    g = Grammar.json_schema(City)
    assert json.loads(g.source) == json.loads(json.dumps(City.model_json_schema(), sort_keys=True))
    Constraint(g, token_table(tok, V, [EOS]), V)


def test_cli_json_schema_and_grammar_files(tok, tmp_path, monkeypatch, capsys):
    from edgespec.front import cli

    target, drafter = pair()
    engine = engine_for(target, drafter, tok, 16)
    monkeypatch.setattr(cli, "make_engine", lambda args: engine)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(COMPACT))
    assert cli.main(["generate", "--raw", "--temperature", "0", "--max-new-tokens", "60", "--json-schema",
                     str(schema), "Give me JSON:"]) == 0
    ids = tok.encode("Give me JSON:")
    want = engine.generate(ids, max_new_tokens=60, temperature=0, grammar=Grammar.json_schema(COMPACT)).text
    assert capsys.readouterr().out == want + "\n"
    lark = tmp_path / "g.lark"
    lark.write_text('start: ("yes" | "no") "!"\n')
    assert cli.main(["generate", "--raw", "--temperature", "0", "--grammar", str(lark), "Well?"]) == 0
    assert capsys.readouterr().out in ("yes!\n", "no!\n")
    lark.write_text("start: nowhere\n")
    assert cli.main(["generate", "--raw", "--grammar", str(lark), "Well?"]) == 2
    assert "Lark grammar cannot be compiled" in capsys.readouterr().err


@pytest.mark.parametrize("flag,text,match", [
    ("--json-schema", '{"type": "strin"}', "JSON schema cannot be compiled"),
    ("--json-schema", '{"type": "object",', "not valid JSON"),
    ("--json-schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
    ("--grammar", "start: nowhere\n", "Lark grammar cannot be compiled"),
    ("--grammar", "start: /[a-/\n", "Lark grammar cannot be compiled"),
])
def test_cli_refuses_bad_grammar_files_before_loading_a_model(tmp_path, monkeypatch, capsys, flag, text, match):
    from edgespec.front import cli

    def never(args):
        raise AssertionError("the model was loaded before the grammar file was checked")

    monkeypatch.setattr(cli, "make_engine", never)
    path = tmp_path / "g.txt"
    path.write_text(text)
    assert cli.main(["generate", "--raw", flag, str(path), "Well?"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert cli.main(["generate", "--raw", flag, str(tmp_path / "missing.json"), "Well?"]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("vocab", [49152, 49155, 70])
def test_bitmask_unpacks_as_llguidance_packs_it(vocab):
    """grammar.unpack reads llguidance's int32 words as token 32 w + j at bit j (all 32 bits, the sign
    bit included), for a vocabulary that is not a multiple of 32."""
    from edgespec.core.grammar import unpack

    words = torch.randint(-2**31, 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    want = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(5, -1)[:, :vocab]
    assert torch.equal(unpack(words, vocab), want)
    one = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    j = (vocab - 1) % 32
    one[0, (vocab - 1) // 32] = (1 << j) - (2**32 if j == 31 else 0)  # the last token alone (bit 31: the sign)
    assert unpack(one, vocab)[0].nonzero().flatten().tolist() == [vocab - 1]
    on = unpack(words.to("meta"), vocab)  # the table follows the words' device (a GPU's, in use)
    assert on.device.type == "meta" and on.shape == (5, vocab)
