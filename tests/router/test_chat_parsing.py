"""Reasoning and tool-call parsing wired through /v1/chat/completions (router.parsers, glm47
tool calls, glm45 reasoning) with the official openai client, streaming and not; the
peer replies with a fixed GLM-4.7-style output."""

from __future__ import annotations

import json

import openai

from glmserve.shared import protocol as P

REPLY = ("Let me think.</think>I will call it.<tool_call>get_weather<arg_key>city</arg_key>"
         "<arg_value>Paris</arg_value></tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
PARSERS = ["--tool_call_parser", "glm47", "--reasoning_parser", "glm45"]


def _eos_reply(tok) -> str:
    return REPLY + tok.decode([tok.eos_token_ids[0]], skip_special_tokens=False)


def test_tool_call_and_reasoning_non_streaming(fleet):
    router, peer, tok = fleet(reply=REPLY, router_args=PARSERS)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    n = len(tok.encode(REPLY))
    r = client.chat.completions.create(model="glm", messages=[{"role": "user", "content": "weather in Paris?"}],
                                       tools=TOOLS, max_tokens=n, temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == "Let me think."
    assert msg.content == "I will call it."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    # the tools reached the prompt through the chat template
    prompt = tok.decode(P.unpack_ids(peer.messages(P.Reserve)[-1].prompt_ids), skip_special_tokens=False)
    assert "get_weather" in prompt and prompt.rstrip().endswith("<think>")


def test_tool_call_and_reasoning_streaming(fleet):
    router, peer, tok = fleet(reply=REPLY, router_args=PARSERS)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    n = len(tok.encode(REPLY))
    chunks = list(client.chat.completions.create(
        model="glm", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, max_tokens=n, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.reasoning_content or "" for d in deltas if hasattr(d, "reasoning_content")) == "Let me think."
    assert "".join(d.content or "" for d in deltas) == "I will call it."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}


def test_thinking_disabled_gives_plain_content(fleet):
    router, peer, tok = fleet(reply="Plain answer.", router_args=PARSERS)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    r = client.chat.completions.create(model="glm", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == tok.decode(tok.encode("Plain answer.")[:3])
    prompt = tok.decode(P.unpack_ids(peer.messages(P.Reserve)[-1].prompt_ids), skip_special_tokens=False)
    assert not prompt.rstrip().endswith("<think>")
