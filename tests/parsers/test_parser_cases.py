"""Every case text parses to its expected message, and streaming gives the same at every split."""
import json
import random

import pytest

from parser_cases import CASES, make, stream, without_ids

IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,kwargs,text,expected", CASES, ids=IDS)
def test_parse_full(name, kwargs, text, expected):
    message = make(kwargs).parse_full(text)
    assert without_ids(message) == expected
    for i, call in enumerate(message.get("tool_calls", [])):
        assert call["id"] == f"id{i}"
        json.loads(call["function"]["arguments"])  # always valid JSON


def _splits(text, rng):
    yield [text]
    for n in (1, 2, 3, 4, 5, 7, 11):
        yield [text[i:i + n] for i in range(0, len(text), n)]
    for k in range(1, len(text)):
        yield [text[:k], text[k:]]
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("name,kwargs,text,expected", CASES, ids=IDS)
def test_every_split_gives_the_same_message(name, kwargs, text, expected):
    full = make(kwargs).parse_full(text)
    rng = random.Random(name)
    for pieces in _splits(text, rng):
        deltas, message = stream(make(kwargs), pieces)
        assert message == full, pieces
        _check_delta_shape(deltas)


def _check_delta_shape(deltas):
    seen = set()
    for delta in deltas:
        assert len(delta) == 1 and next(iter(delta.values()))
        for part in delta.get("tool_calls", []):
            if part["index"] not in seen:  # first delta of a call: id, type and the whole name once
                assert part["id"] and part["type"] == "function" and part["function"]["name"]
                seen.add(part["index"])
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
