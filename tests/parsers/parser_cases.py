"""Shared tools and output texts for the parser tests (GLM-4.5 and GLM-4.7 shaped outputs)."""
from glmserve.router.parsers import ChatOutputParser, merge_deltas

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "verbose": {"type": "boolean"},
        "ratio": {"type": "number"}, "opts": {"type": "object"}, "tags": {"type": "array"},
        "code": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "run_in_terminal", "parameters": {"type": "object", "properties": {
        "command": {"type": "string"}}}}},
]

# (name, parser kwargs, output text, expected message without ids)
G45 = dict(tool_call_parser="glm45", reasoning_parser="glm45", prompt_ends_in_think=False)
G47 = dict(tool_call_parser="glm47", reasoning_parser="glm45", prompt_ends_in_think=True)


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def msg(content=None, reasoning=None, calls=None):
    out = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        out["tool_calls"] = calls
    return out


CASES = [
    ("glm45_two_calls", G45,
     "\n<think>Need tool.</think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
     "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n<tool_call>get_time\n</tool_call>",
     msg("Let me check.", "Need tool.", [call("get_weather", '{"city": "Paris", "days": 2}'), call("get_time", "{}")])),
    ("glm47_compact", G47,
     "Need tool.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Pa\"ris é</arg_value>"
     "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>get_time</tool_call>",
     msg("Let me check.", "Need tool.", [call("get_weather", '{"city": "Pa\\"ris é", "days": 2}'), call("get_time", "{}")])),
    ("typed_values", G47,
     "r</think><tool_call>get_weather<arg_key>verbose</arg_key><arg_value>true</arg_value><arg_key>ratio</arg_key>"
     "<arg_value> 1.5 </arg_value><arg_key>opts</arg_key><arg_value>{\"a\": [1, null]}</arg_value><arg_key>tags</arg_key>"
     "<arg_value>[\"x\"]</arg_value><arg_key>code</arg_key><arg_value>abc</arg_value><arg_key>note</arg_key>"
     "<arg_value>null</arg_value><arg_key>city</arg_key><arg_value>123</arg_value></tool_call>",
     msg(None, "r", [call("get_weather", '{"verbose": true, "ratio": 1.5, "opts": {"a": [1, null]}, "tags": ["x"], '
                                         '"code": "abc", "note": null, "city": "123"}')])),
    ("whitespace_between_tags", G47,
     "r</think>\n<tool_call> get_weather \n <arg_key> city </arg_key>\n  <arg_value>Rome</arg_value>\n\n"
     "<arg_key>code</arg_key> <arg_value>42</arg_value>  </tool_call>\n\n",
     msg(None, "r", [call("get_weather", '{"city": "Rome", "code": 42}')])),
    ("call_inside_think", G47,
     "I should look.\n<tool_call>run_in_terminal<arg_key>command</arg_key><arg_value>ls -la | grep \"<x>\"\n"
     "</arg_value></tool_call>",
     msg(None, "I should look.", [call("run_in_terminal", '{"command": "ls -la | grep \\"<x>\\"\\n"}')])),
    ("undeclared_tool_is_content", G47,
     "r</think>Sure.<tool_call>delete_all<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>",
     msg("Sure.<tool_call>delete_all<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>", "r")),
    ("missing_arg_key_is_content", G47,
     "r</think><tool_call>get_weathercity</arg_key><arg_value>Paris</arg_value></tool_call> ok",
     msg("<tool_call>get_weathercity</arg_key><arg_value>Paris</arg_value></tool_call> ok", "r")),
    ("broken_after_name", G45,
     "<think>t</think>\nA\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
     "<arg_key>days</arg_key>3</arg_value>\n</tool_call>",
     msg("A\n<arg_key>days</arg_key>3</arg_value>\n</tool_call>", "t", [call("get_weather", '{"city": "Oslo"}')])),
    ("truncated_in_string", G47,
     "r</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Par",
     msg(None, "r", [call("get_weather", '{"city": "Par"}')])),
    ("truncated_in_int", G47,
     "r</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>X</arg_value><arg_key>days</arg_key><arg_value>1",
     msg("<arg_key>days</arg_key><arg_value>1", "r", [call("get_weather", '{"city": "X"}')])),
    ("truncated_reasoning", G47, "still thinking about <thi", msg(None, "still thinking about <thi")),
    ("glm45_no_think_answer", G45, "\n\nPlain answer with <b>html</b>.", msg("Plain answer with <b>html</b>.")),
    ("glm45_think_then_text_after_call", G45,
     "<think>\nplan\n</think>\n\n<tool_call>get_time\n</tool_call>\nDone.",
     msg("Done.", "plan", [call("get_time", "{}")])),
    ("repeated_think_tag", G47, "<think>deep</think>Answer <think> literal", msg("Answer <think> literal", "deep")),
    ("lonely_lt_signs", G47, "a < b</think>x <tool x <tool_cal y", msg("x <tool x <tool_cal y", "a < b")),
    ("empty_name_is_content", G47, "r</think><tool_call></tool_call><tool_call>\n<arg_key>a</arg_key>",
     msg("<tool_call></tool_call><tool_call>\n<arg_key>a</arg_key>", "r")),
    ("unknown_key_decoded_as_json", G47,
     "r</think><tool_call>get_weather<arg_key>extra</arg_key><arg_value>123</arg_value><arg_key>more</arg_key>"
     "<arg_value>free text</arg_value></tool_call>",
     msg(None, "r", [call("get_weather", '{"extra": 123, "more": "free text"}')])),
    ("call_restarts_inside_call", G47, "r</think><tool_call>get_time<tool_call>get_time</tool_call>",
     msg("<tool_call>get_time", "r", [call("get_time", "{}")])),  # the unclosed first name is content
    ("unicode_and_mtp", G47, "思考🙂</think>答案：<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京🙂"
     "</arg_value></tool_call>", msg("答案：", "思考🙂", [call("get_weather", '{"city": "北京🙂"}')])),
]


def make(kwargs, **extra):
    return ChatOutputParser(tools=TOOLS, call_id_prefix="id", **{**kwargs, **extra})


def without_ids(message):
    message = dict(message)
    if "tool_calls" in message:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]
    return message


def stream(parser, pieces):
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, merge_deltas(deltas)
