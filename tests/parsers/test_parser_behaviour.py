"""Parser rules one by one: reasoning modes, tool_choice, streaming shape, parser names."""
import json

import pytest

from parser_cases import G45, G47, TOOLS, make, stream, without_ids
from glmserve.router.parsers import ChatOutputParser, normalize_parser_name

CALL47 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"


def test_parser_names_accept_dash_and_dot_spellings():
    assert normalize_parser_name("glm45", ("glm45", "glm47")) == "glm45"
    assert normalize_parser_name("glm-4.5", ("glm45", "glm47")) == "glm45"
    assert normalize_parser_name("GLM-47", ("glm45", "glm47")) == "glm47"
    assert normalize_parser_name("glm4_moe", ("glm45", "glm47")) == "glm45"
    assert normalize_parser_name(None, ("glm45",)) is None
    with pytest.raises(ValueError):
        normalize_parser_name("hermes", ("glm45", "glm47"))


def test_both_tool_parsers_read_both_formats():
    text45 = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
    for parser in ("glm45", "glm47"):
        for text in (text45, CALL47):
            message = ChatOutputParser(parser, None, tools=TOOLS).parse_full(text)
            assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
            assert message["content"] is None


def test_thinking_disabled_is_all_content():
    text = "<think>not reasoning</think>Answer"
    assert make(G45, enable_thinking=False).parse_full(text)["content"] == text
    assert make(G47, enable_thinking=False).parse_full("Answer</think>")["reasoning_content"] is None
    assert ChatOutputParser(reasoning_parser=None).parse_full(text)["content"] == text


def test_reasoning_with_and_without_leading_think():
    for text in ("<think>why</think>Because.", "why</think>Because.", "\n<think>\nwhy\n</think>\n\nBecause."):
        message = make(G47).parse_full(text)
        assert (message["reasoning_content"], message["content"]) == ("why", "Because.")
    # GLM-4.5 prompt does not open the block: without <think> in the output it is all content
    assert make(G45).parse_full("why</think>Because.")["content"] == "why</think>Because."
    assert make(G45).parse_full("<think>why</think>Because.")["reasoning_content"] == "why"


def test_truncated_reasoning_is_all_reasoning():
    message = make(G47).parse_full("I was still thinking")
    assert message == {"role": "assistant", "content": None, "reasoning_content": "I was still thinking"}


def test_tool_call_inside_think_ends_reasoning_and_is_emitted():
    message = make(G47).parse_full("Let me look it up. " + CALL47 + "</think>")
    assert message["reasoning_content"] == "Let me look it up."
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert message["content"] == "</think>"  # text after the call is content, verbatim
    # without tool parsing the same text stays reasoning
    assert ChatOutputParser(None, "glm45", prompt_ends_in_think=True).parse_full(
        "a " + CALL47)["reasoning_content"] == "a " + CALL47


def test_malformed_call_inside_think_stays_reasoning():
    message = make(G47).parse_full("hmm <tool_call>unknown_tool</tool_call> more</think>ok")
    assert message["reasoning_content"] == "hmm <tool_call>unknown_tool</tool_call> more"
    assert message["content"] == "ok" and "tool_calls" not in message


def test_tool_choice_none_named_required():
    text = "r</think>" + CALL47 + "<tool_call>get_time</tool_call>"
    none = make(G47, tool_choice="none").parse_full(text)
    assert "tool_calls" not in none and none["content"] == CALL47 + "<tool_call>get_time</tool_call>"
    named = make(G47, tool_choice={"type": "function", "function": {"name": "get_time"}})
    message = named.parse_full(text)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
    assert message["content"] == CALL47 and not named.missing_required_call
    required = make(G47, tool_choice="required")
    assert required.parse_full("r</think>No tool for you.")["content"] == "No tool for you."
    assert required.missing_required_call
    auto = make(G47)
    auto.parse_full("r</think>plain")
    assert not auto.missing_required_call and auto.num_tool_calls == 0


def test_no_tools_means_no_tool_parsing():
    message = ChatOutputParser("glm47", "glm45", tools=None, prompt_ends_in_think=True).parse_full("r</think>" + CALL47)
    assert message["content"] == CALL47 and "tool_calls" not in message


def test_string_values_stream_before_the_value_ends():
    parser = make(G47)
    deltas = parser.feed("r</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>San Fr")
    fragments = [p["function"].get("arguments", "") for d in deltas for p in d.get("tool_calls", [])]
    assert "".join(fragments) == '{"city": "San Fr'
    more = parser.feed("ancisco</arg_value><arg_key>days</arg_key><arg_value>1")
    assert [p["function"]["arguments"] for d in more for p in d["tool_calls"]] == ['ancisco"']  # int held whole
    rest = parser.feed("0</arg_value></tool_call>") + parser.finish()
    assert [p["function"]["arguments"] for d in rest for p in d["tool_calls"]] == [', "days": 10}']


def test_name_is_emitted_whole_once_even_char_by_char():
    text = "r</think><tool_call>run_in_terminal<arg_key>command</arg_key><arg_value>ls</arg_value></tool_call>"
    deltas, message = stream(make(G47), list(text))
    names = [p["function"]["name"] for d in deltas for p in d.get("tool_calls", []) if "name" in p["function"]]
    assert names == ["run_in_terminal"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"command": "ls"}


def test_content_before_call_streams_as_content():
    parser = make(G47)
    assert parser.feed("r</think>Checking the weather now") == [{"reasoning_content": "r"},
                                                                  {"content": "Checking the weather now"}]
    assert parser.feed(" <tool_") == []  # trailing space and a possible '<tool_call>' are held
    assert parser.feed("box> ") == [{"content": " <tool_box>"}]
    deltas = parser.feed("<tool_call>get_time</tool_call>") + parser.finish()
    assert [d for d in deltas if "content" in d] == []  # the space before the call is dropped


def test_call_indices_follow_call_order_and_ids_are_unique():
    text = "r</think>" + "<tool_call>get_time</tool_call>" * 3
    message = ChatOutputParser("glm47", "glm45", tools=TOOLS, prompt_ends_in_think=True).parse_full(text)
    ids = [c["id"] for c in message["tool_calls"]]
    assert len(set(ids)) == 3 and all(i.startswith("call_") for i in ids)
    other = ChatOutputParser("glm47", "glm45", tools=TOOLS, prompt_ends_in_think=True).parse_full(text)
    assert not set(ids) & {c["id"] for c in other["tool_calls"]}


def test_feed_after_finish_is_an_error_and_finish_is_idempotent():
    parser = make(G47)
    parser.feed("x</think>y ")
    assert parser.finish() == [{"content": " "}]
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_expected_message_shapes_for_full_and_stream_equal():
    text = "r</think>ok" + CALL47
    full = without_ids(make(G47).parse_full(text))
    assert full == without_ids(stream(make(G47), [text[:13], text[13:40], text[40:]])[1])


def test_unknown_prompt_end_defaults_to_reasoning_like_other_engines():
    parser = ChatOutputParser("glm47", "glm45", tools=TOOLS)  # prompt_ends_in_think not given
    assert parser.parse_full("why</think>ok")["reasoning_content"] == "why"
    assert ChatOutputParser("glm47", "glm45").parse_full("<think>why</think>ok")["content"] == "ok"


def test_feed_batch_reads_as_one_merged_delta():
    parser = make(G47)
    batch = parser.feed("r</think>Hi <tool_call>get_weather<arg_key>city</arg_key><arg_value>Ro")
    assert isinstance(batch, list) and len(batch) == 3
    assert (batch.reasoning_content, batch.content) == ("r", "Hi")
    assert batch.tool_calls == [{"index": 0, "id": "id0", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Ro'}}]
    assert batch.merged() == {"reasoning_content": "r", "content": "Hi", "tool_calls": batch.tool_calls}
    tail = parser.feed("me</arg_value></tool_call>")
    assert tail.tool_calls == [{"index": 0, "function": {"arguments": 'me"}'}}] and tail.content == ""


def test_request_helpers():
    from glmserve.router.parsers import prompt_ends_in_think, thinking_enabled
    assert prompt_ends_in_think("[gMASK]<sop><|user|>Hi<|assistant|><think>")
    assert not prompt_ends_in_think("[gMASK]<sop><|user|>\nHi<|assistant|>")
    assert not prompt_ends_in_think("<|assistant|>\n<think></think>")
    assert thinking_enabled(None) and thinking_enabled({"enable_thinking": True})
    assert not thinking_enabled({"enable_thinking": False}) and not thinking_enabled({"enable_thinking": None})
    assert thinking_enabled({"enable_thinking": "false"})  # a non-empty string is truthy in the template too
