"""Argument typing by JSON schema (spec §7.2 rules as chosen in router/parsers/schema.py)."""
import pytest

from glmserve.router.parsers.schema import ANY, ToolSchemas, allowed_types, decode_value

S = frozenset


@pytest.mark.parametrize("raw,types,expected", [
    (" Paris ", S({"string"}), " Paris "),          # string: verbatim, not stripped
    ('"quoted"', S({"string"}), '"quoted"'),        # quotes kept (vLLM behaviour)
    ("123", S({"string"}), "123"),                  # a string param "123" stays a string
    (" 42 ", S({"integer"}), 42),
    ("2.0", S({"integer"}), 2),
    ("2.5", S({"number"}), 2.5),
    ("7", S({"number"}), 7),
    ("true", S({"boolean"}), True),
    ("False", S({"boolean"}), False),               # Python literal accepted
    ("null", S({"null"}), None),
    ('{"a": [1, 2]}', S({"object"}), {"a": [1, 2]}),
    ("{'a': 1}", S({"object"}), {"a": 1}),          # Python dict literal
    ("[1, 2]", S({"array"}), [1, 2]),
    ("abc", S({"integer", "string"}), "abc"),       # anyOf falls back to the string branch
    ("12", S({"integer", "string"}), 12),           # the non-string branch wins when it fits
    ("null", S({"string", "null"}), None),
    ("abc", S({"integer"}), "abc"),                 # cannot be typed: raw text, never an exception
    ("NaN", S({"number"}), "NaN"),                  # not JSON
    ("123", ANY, 123),                              # no schema: JSON when it parses
    ('{"x": 1}', ANY, {"x": 1}),
    ("hello world", ANY, "hello world"),
])
def test_decode_value(raw, types, expected):
    value = decode_value(raw, types)
    assert value == expected and type(value) is type(expected)


def test_allowed_types_from_schema_forms():
    root = {"$defs": {"Unit": {"enum": ["c", "f"]}, "N": {"type": "integer"}}}
    assert allowed_types({"type": "string"}) == S({"string"})
    assert allowed_types({"type": ["integer", "null"]}) == S({"integer", "null"})
    assert allowed_types({"anyOf": [{"type": "integer"}, {"type": "string"}]}) == S({"integer", "string"})
    assert allowed_types({"oneOf": [{"type": "integer"}, {"description": "anything"}]}) == ANY
    assert allowed_types({"allOf": [{"description": "x"}, {"type": "boolean"}]}) == S({"boolean"})
    assert allowed_types({"enum": [1, 2]}) == S({"integer"})
    assert allowed_types({"const": "x"}) == S({"string"})
    assert allowed_types({"$ref": "#/$defs/Unit"}, root) == S({"string"})
    assert allowed_types({"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}, root) == S({"integer", "null"})
    assert allowed_types({"description": "no type"}) == ANY
    assert allowed_types({"$ref": "#/$defs/Missing"}, root) == ANY


def test_tool_schemas_lookup_and_named_choice():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}, "$defs": {"N": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "g"}}]
    schemas = ToolSchemas(tools)
    assert schemas.is_declared("f") and schemas.is_declared("g") and not schemas.is_declared("h")
    assert schemas.arg_types("f", "n") == S({"integer"})
    assert schemas.arg_types("f", "unknown") == ANY and schemas.arg_types("g", "x") == ANY
    only_g = ToolSchemas(tools, only_name="g")
    assert only_g.is_declared("g") and not only_g.is_declared("f")
    assert not ToolSchemas(None) and ToolSchemas(None, accept_any=True).is_declared("anything")
