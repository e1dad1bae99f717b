"""A JSON schema's properties are written in the schema's own order.

llguidance emits an object's properties in the order the schema lists them. `Grammar.json_schema` once
stored the schema with its keys sorted, so {"name", "age"} forced "age" first: not the order the prompt
showed the model (nor OpenAI's), a worse answer from a small model, and drafts the target's masked pick
disagreed with more often (scripts/structured_acceptance.py).
"""
from __future__ import annotations

import json

import pytest

from edgespec.core.grammar import Constraint, Grammar, token_table

V, EOS = 49152, 2


@pytest.fixture(scope="module")
def tok():
    from edgespec.loading.models import load_tokenizer

    return load_tokenizer(None)


def first_key_allowed(tok, schema, key: str) -> bool:
    state = Constraint(Grammar.json_schema(schema), token_table(tok, V, [EOS]), V).start()
    state.extend(tok.encode('{"'))
    return bool(state.allowed()[tok.encode(key)[0]])


@pytest.mark.parametrize("order", [["name", "age"], ["age", "name"]])
def test_properties_come_in_the_schemas_order(tok, order):
    props = {"name": {"type": "string"}, "age": {"type": "integer"}}
    schema = {"type": "object", "properties": {k: props[k] for k in order}, "required": order,
              "additionalProperties": False}
    assert first_key_allowed(tok, schema, order[0])
    assert not first_key_allowed(tok, schema, order[1])


def test_the_schema_text_keeps_its_key_order():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    g = Grammar.json_schema(json.dumps(schema))
    assert list(json.loads(g.source)["properties"]) == ["b", "a"]
    assert g != Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
