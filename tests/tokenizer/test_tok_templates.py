"""Chat templates: spec §6 literal renders for GLM-4.5 and GLM-4.7, and transformers-equal rendering."""
import json
import os

import pytest

from glmserve.shared.tokenizer import load_tokenizer, normalize_messages
from glmserve.shared.tokenizer.builtin import write_builtin_tokenizer
from glmserve.shared.tokenizer.render import render_chat_template
from glmserve.shared.tokenizer.templates import GLM45_TEMPLATE, GLM47_TEMPLATE, detect_template_format

HERE = os.path.dirname(__file__)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HISTORY = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need tool.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon", "days": 3}}}]},
    {"role": "tool", "tool_call_id": "a", "content": '{"temp": 20}'},
    {"role": "tool", "tool_call_id": "b", "content": '{"temp": 18}'},
]
TOOL_JSON = json.dumps(TOOLS[0], ensure_ascii=False)
GREET = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
         {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def glm45():
    return load_tokenizer(None, template_format="glm45")


@pytest.fixture(scope="module")
def glm47():
    return load_tokenizer(None, template_format="glm47")


def test_glm45_spec_example(glm45):
    out = glm45.apply_chat_template(HISTORY, tools=TOOLS)
    head = ("[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + TOOL_JSON
            + "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML "
            "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
            "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
    body = ("<|system|>\nYou are helpful.<|user|>\nWeather in Paris?<|assistant|>\n<think>Need tool.</think>\nLet me "
            "check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
            "<arg_value>2</arg_value>\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lyon"
            "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><|observation|>\n<tool_response>\n"
            '{"temp": 20}\n</tool_response>\n<tool_response>\n{"temp": 18}\n</tool_response><|assistant|>')
    assert out == head + body


def test_glm45_thinking_off_and_history(glm45):
    assert glm45.apply_chat_template(GREET) == (
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello!<|user|>\nBye<|assistant|>")
    assert glm45.apply_chat_template(GREET, enable_thinking=False) == (
        "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello!<|user|>\nBye/nothink"
        "<|assistant|>\n<think></think>")
    already = [{"role": "user", "content": "Hi /nothink"}]
    assert glm45.apply_chat_template(already, enable_thinking=False).count("/nothink") == 1


def test_glm47_spec_examples(glm47):
    assert glm47.apply_chat_template(GREET) == "[gMASK]<sop><|user|>Hi<|assistant|></think>Hello!<|user|>Bye<|assistant|><think>"
    assert glm47.apply_chat_template(GREET, clear_thinking=False) == (
        "[gMASK]<sop><|user|>Hi<|assistant|><think>greet</think>Hello!<|user|>Bye<|assistant|><think>")
    assert glm47.apply_chat_template(GREET, enable_thinking=False).endswith("<|user|>Bye<|assistant|></think>")
    assert "/nothink" not in glm47.apply_chat_template(GREET, enable_thinking=False)


def test_glm47_tools_and_results(glm47):
    out = glm47.apply_chat_template(HISTORY, tools=TOOLS)
    assert out.startswith("[gMASK]<sop><|system|>\n# Tools\n\n") and TOOL_JSON + "\n</tools>" in out
    assert "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>" in out
    assert out.endswith(
        "<|system|>You are helpful.<|user|>Weather in Paris?<|assistant|><think>Need tool.</think>Let me check."
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2"
        "</arg_value></tool_call><tool_call>get_weather<arg_key>city</arg_key><arg_value>Lyon</arg_value><arg_key>days"
        "</arg_key><arg_value>3</arg_value></tool_call><|observation|><tool_response>{\"temp\": 20}</tool_response>"
        "<tool_response>{\"temp\": 18}</tool_response><|assistant|><think>")


@pytest.mark.parametrize("fmt,zero,values", [
    ("glm45", "\n<tool_call>get_time\n</tool_call>", "\n<arg_key>a</arg_key>\n<arg_value>1.5</arg_value>"),
    ("glm47", "<tool_call>get_time</tool_call>", "<arg_key>a</arg_key><arg_value>1.5</arg_value>"),
])
def test_zero_arg_calls_and_value_rendering(fmt, zero, values):
    tok = load_tokenizer(None, template_format=fmt)
    args = {"a": 1.5, "b": True, "c": None, "d": {"x": [1, 2]}, "e": "raw \"str\" é"}
    msgs = [{"role": "user", "content": "t"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        {"type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}]}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert zero in out and values in out
    for rendered in ("<arg_value>true</arg_value>", "<arg_value>null</arg_value>",
                     '<arg_value>{"x": [1, 2]}</arg_value>', '<arg_value>raw "str" é</arg_value>'):
        assert rendered in out
    assert not out.endswith("<|assistant|>") and "None" not in out


def test_reasoning_split_from_content_and_content_parts(glm47):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "<think>\nhidden\n</think>\n\nAnswer"}]
    assert glm47.apply_chat_template(msgs, add_generation_prompt=False) == \
        "[gMASK]<sop><|user|>Q?<|assistant|><think>hidden</think>Answer"
    aliased = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "why"}]
    assert "<think>why</think>A" in glm47.apply_chat_template(aliased, add_generation_prompt=False)


def test_bad_arguments_raise_value_error(glm47):
    msgs = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(ValueError):
        glm47.apply_chat_template(msgs)
    msgs[0]["tool_calls"][0]["function"]["arguments"] = "[1]"
    with pytest.raises(ValueError):
        glm47.apply_chat_template(msgs)
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == "[1]"  # caller's data untouched


def test_format_detection():
    upstream = open(os.path.join(HERE, "glm46_style_template.jinja")).read()
    assert detect_template_format(upstream) == "glm45"
    assert detect_template_format(GLM45_TEMPLATE) == "glm45" and detect_template_format(GLM47_TEMPLATE) == "glm47"


def test_checkpoint_template_renders_like_transformers(tmp_path):
    """A tokenizer_config.json chat_template that relies on trim_blocks/lstrip_blocks, vs transformers."""
    from transformers import AutoTokenizer
    write_builtin_tokenizer(str(tmp_path))
    upstream = open(os.path.join(HERE, "glm46_style_template.jinja")).read()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = upstream
    config_path.write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4_moe", "eos_token_id": [988, 995, 997]}))
    ours = load_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.template_format == "glm45" and ours.eos_token_ids == (988, 995, 997)
    cases = [(HISTORY, TOOLS, {}), (GREET, None, {}), (GREET, None, {"enable_thinking": False}),
             (HISTORY + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}], TOOLS, {})]
    builtin45 = load_tokenizer(None, template_format="glm45")
    for messages, tools, kwargs in cases:
        expected = hf.apply_chat_template(normalize_messages(messages), tools=tools, tokenize=False,
                                          add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(messages, tools=tools, **kwargs) == expected
        assert builtin45.apply_chat_template(messages, tools=tools, **kwargs) == expected


def test_chat_template_jinja_file_wins(tmp_path):
    write_builtin_tokenizer(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text(GLM45_TEMPLATE)
    tok = load_tokenizer(str(tmp_path))
    assert tok.template_format == "glm45"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[gMASK]<sop><|user|>\nx<|assistant|>"


def test_model_type_picks_builtin_template_when_none(tmp_path):
    write_builtin_tokenizer(str(tmp_path))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4_moe"}))
    assert load_tokenizer(str(tmp_path)).template_format == "glm45"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4_moe_lite"}))
    assert load_tokenizer(str(tmp_path)).template_format == "glm47"
    assert load_tokenizer(str(tmp_path), template_format="glm45").template_format == "glm45"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_render_matches_sandbox_rules():
    with pytest.raises(Exception):
        render_chat_template("{{ ''.__class__.__mro__ }}", [])
    out = render_chat_template("{% for m in messages %}\n  {{ m.content | tojson }}\n{% endfor %}", [{"content": "é"}])
    assert out == '  "é"\n'  # trim_blocks + lstrip_blocks + ensure_ascii=False


@pytest.mark.parametrize("fmt", ["glm45", "glm47"])
def test_builtin_templates_render_the_same_through_transformers(tmp_path, fmt):
    """Each built-in template, written into tokenizer_config.json, renders identically in transformers."""
    from transformers import AutoTokenizer
    from glmserve.shared.tokenizer.templates import TEMPLATES
    write_builtin_tokenizer(str(tmp_path))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATES[fmt]
    config_path.write_text(json.dumps(config))
    ours, hf = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.template_format == fmt
    for kwargs in ({}, {"enable_thinking": False}, {"clear_thinking": False}):
        for messages, tools in ((HISTORY, TOOLS), (GREET, None)):
            expected = hf.apply_chat_template(normalize_messages(messages), tools=tools, tokenize=False,
                                              add_generation_prompt=True, **kwargs)
            assert ours.apply_chat_template(messages, tools=tools, **kwargs) == expected
