"""The router's text path: token ids -> IncrementalDetokenizer (several ids per step, as MTP
delivers them) -> ChatOutputParser, against parse_full of the whole decoded text."""
import pytest

from parser_cases import CASES, make, stream
from glmserve.router.parsers import merge_deltas
from glmserve.shared.tokenizer import IncrementalDetokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("name,kwargs,text,expected", CASES, ids=[c[0] for c in CASES])
def test_token_stream_matches_full_parse(tok, chunk, name, kwargs, text, expected):
    ids = tok.encode(text + "<|user|>")  # the model ends its turn with <|user|> (an EOS id, skipped)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True, stop=[])
    parser = make(kwargs)
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas += parser.feed(detok.add(ids[i:i + chunk]))
    deltas += parser.feed(detok.finish()) + parser.finish()
    assert detok.text == text
    assert merge_deltas(deltas) == make(kwargs).parse_full(text)


def test_stop_string_cuts_before_the_parser_sees_it(tok):
    text = "plan</think>Answer: 42. END ignored <tool_call>get_time</tool_call>"
    detok = IncrementalDetokenizer(tok, True, ["END"])
    parser = make(dict(tool_call_parser="glm47", reasoning_parser="glm45", prompt_ends_in_think=True))
    ids = tok.encode(text)
    pieces = [detok.add(ids[i:i + 2]) for i in range(0, len(ids), 2)]
    assert detok.stopped
    _, message = stream(parser, pieces)
    assert message == {"role": "assistant", "content": "Answer: 42. ", "reasoning_content": "plan"}
