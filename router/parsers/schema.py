"""Tool-call argument typing by the tool's JSON schema (spec §7.2), for the GLM parsers.

Runs in the router process. GLM writes every argument value as raw text between
`<arg_value>` and `</arg_value>`; this module decides what JSON value that text stands for.

Rules (one function, used by streaming and non-streaming alike):
  * the property's allowed types come from `type` (str or list), `anyOf` / `oneOf` (union of
    the branches), `allOf` (first branch with a type), `enum` / `const` (types of the values),
    local `$ref`s (`#/$defs/...`, `#/definitions/...`); none of these -> "any";
  * exactly {"string"}: the raw text, verbatim (not stripped, quotes kept) — these stream;
  * otherwise json.loads(text.strip()); kept when its type is allowed ("integer" also takes an
    integral float, "number" takes ints); else Python literals (True/False/None, 'quoted')
    through ast.literal_eval when that type is allowed; else the raw text when "string" is
    allowed; else the decoded JSON if any; else the raw text;
  * "any" (no schema, unknown key): decoded JSON when the text parses, else the raw text.
"""
import ast
import json
from typing import Any

ANY = frozenset({"any"})
STRING_ONLY = frozenset({"string"})


def _resolve(schema: Any, root: dict, depth: int = 0) -> dict:
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and depth < 8:
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return _resolve(node, root, depth + 1)
    return schema


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def allowed_types(schema: Any, root: dict | None = None, depth: int = 0) -> frozenset[str]:
    """The JSON types a property schema accepts; ANY when it does not say."""
    root = root if root is not None else (schema if isinstance(schema, dict) else {})
    schema = _resolve(schema, root)
    if depth > 8 or not schema:
        return ANY
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset({kind})
    if isinstance(kind, list) and kind:
        return frozenset(str(k) for k in kind)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [allowed_types(b, root, depth + 1) for b in schema[key]]
            return ANY if any(b == ANY for b in branches) or not branches else frozenset().union(*branches)
    for branch in schema.get("allOf") or []:
        types = allowed_types(branch, root, depth + 1)
        if types != ANY:
            return types
    values = schema["enum"] if isinstance(schema.get("enum"), list) else (
        [schema["const"]] if "const" in schema else None)
    if values:
        return frozenset(_json_type(v) for v in values)
    return ANY


def _fits(value: Any, types: frozenset[str]) -> bool:
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def _as_integer(value: Any, types: frozenset[str]) -> Any:
    if isinstance(value, float) and value.is_integer() and "integer" in types and "number" not in types:
        return int(value)
    return value


def decode_value(raw: str, types: frozenset[str]) -> Any:
    """The JSON value of one `<arg_value>` text under the allowed `types` (module rules)."""
    if types == STRING_ONLY:
        return raw
    text = raw.strip()
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)  # no NaN / Infinity
        ok = True
    except ValueError:
        parsed, ok = None, False
    if types == ANY:
        return parsed if ok else raw
    if ok:
        parsed = _as_integer(parsed, types)
        if _fits(parsed, types):
            return parsed
    literal = _python_literal(text)
    if literal is not _MISSING and _fits(literal, types):
        return literal
    if "string" in types:
        return raw
    return parsed if ok else raw


_MISSING = object()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _python_literal(text: str) -> Any:
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return _MISSING
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return _MISSING
    return value


class ToolSchemas:
    """Declared tools of one request: which names may be called and each argument's types."""

    def __init__(self, tools: list[dict] | None, only_name: str | None = None, accept_any: bool = False):
        self._params: dict[str, dict] = {}
        self._accept_any = accept_any  # debugging without tools: any name, schema-less values
        for tool in tools or []:
            function = tool.get("function", tool) if isinstance(tool, dict) else {}
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str) and (only_name is None or name == only_name):
                params = function.get("parameters")
                self._params[name] = params if isinstance(params, dict) else {}

    def __bool__(self) -> bool:
        return bool(self._params) or self._accept_any

    def is_declared(self, name: str) -> bool:
        return name in self._params or self._accept_any

    def arg_types(self, name: str, key: str) -> frozenset[str]:
        params = self._params.get(name, {})
        props = params.get("properties")
        if not isinstance(props, dict) or key not in props:
            return ANY
        return allowed_types(props[key], params)
