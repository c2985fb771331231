"""GLM-shaped outputs with random mutations: never an exception, arguments always a JSON
object of a declared tool, streaming equal to non-streaming at random splits and char by char."""
import json
import random

import pytest

from parser_cases import G45, G47, make, stream

PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
          "</arg_value>", "get_weather", "nope", "city", "42", "\n", " ", "<", ">", "/", "é🙂", "<tool", "</arg"]
KEYS = ["city", "days", "code", "x"]
VALUES = ["Paris", "42", '{"a": 1}', "true", " sp ", "é🙂<b>"]


def _ws(rng: random.Random) -> str:
    return rng.choice(["", "", "\n", " ", "\n\n"])


def _call(rng: random.Random) -> str:
    args = "".join(_ws(rng) + "<arg_key>" + rng.choice(KEYS) + "</arg_key>" + _ws(rng)
                   + "<arg_value>" + rng.choice(VALUES) + "</arg_value>" for _ in range(rng.randint(0, 3)))
    return "<tool_call>" + rng.choice(["get_weather", "get_time", "nope"]) + _ws(rng) + args + _ws(rng) + "</tool_call>"


def _random_text(rng: random.Random) -> str:
    """A GLM-shaped output (reasoning, content, calls) with up to three random mutations."""
    parts = [rng.choice(["", "<think>", "\n<think>"]), "reason " * rng.randint(0, 2), rng.choice(["</think>", ""]),
             _ws(rng), rng.choice(["", "Let me check.", "a < b"])]
    parts += [_ws(rng) + _call(rng) for _ in range(rng.randint(0, 3))]
    text = "".join(parts)
    for _ in range(rng.randint(0, 3)):
        i, op = rng.randint(0, len(text)), rng.random()
        if op < 0.4:
            text = text[:i] + text[i + rng.randint(1, 6):]  # delete a span
        elif op < 0.8:
            text = text[:i] + rng.choice(PIECES) + text[i:]  # insert a tag or text
        else:
            text = text[:i]  # truncate
    return text


@pytest.mark.parametrize("kwargs", [G45, G47, dict(G47, tool_choice="required"), dict(G47, enable_thinking=False)],
                         ids=["glm45", "glm47", "required", "nothink"])
def test_fuzz(kwargs):
    rng = random.Random(1234)
    num_calls = 0
    for _ in range(300):
        text = _random_text(rng)
        full = make(kwargs).parse_full(text)
        for call in full.get("tool_calls", []):
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            assert call["function"]["name"] in ("get_weather", "get_time")
            num_calls += 1
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(make(kwargs), pieces)[1] == full, (text, pieces)
        assert stream(make(kwargs), list(text))[1] == full, text
    assert num_calls > 100  # the generator really exercises calls
