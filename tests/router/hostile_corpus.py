"""A corpus of hostile requests for the router: every field of every endpoint, wrong types,
out-of-range values, malformed bodies, unsupported content. Each must be answered 4xx with an
OpenAI-style error body, before any dispatch (the test router has no live workers).

`corpus(vocab_size, max_total_len, body_limit)` -> list of Case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    method: str = "POST"
    status: int | None = None  # expected exact status; None = any 4xx


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
GEN = "/generate"
MSG = [{"role": "user", "content": "hi"}]

WRONG_TYPES = {  # field -> values of the wrong JSON type (shared by chat and completions)
    "temperature": ["hot", [1], {"a": 1}, True], "top_p": ["x", [0.5]], "top_k": [1.5, "3", True],
    "min_p": ["x"], "frequency_penalty": ["x", {"v": 0}], "presence_penalty": [[1]],
    "repetition_penalty": ["x"], "stop": [5, [1, 2], {"a": "b"}], "stop_token_ids": ["1", [1.5], 3],
    "ignore_eos": ["yes", 1], "seed": ["1", 1.5], "n": ["2", 2.5, True], "stream": ["yes", 1],
    "stream_options": ["x", {"include_usage": "yes"}], "skip_special_tokens": ["no"],
    "max_tokens": ["10", 10.5, [10]], "model": [5, ["glm"]],
}
OUT_OF_RANGE = {  # field -> out-of-range values (valid JSON type)
    "temperature": [-0.1, -1e9, 1e300], "top_p": [0.0, -0.5, 1.5], "top_k": [0, -2, 10**9],
    "min_p": [-0.1, 1.1], "frequency_penalty": [-2.5, 3.0], "presence_penalty": [-3, 2.1],
    "repetition_penalty": [0, -1, 11], "n": [0, -1, 17, 10**6], "seed": [-1, 2**63 - 1],
    "max_tokens": [0, -5, 10**9, 2**64 - 1, 10**30], "stop_token_ids": [[-1], [10**7]],
    "stop": [[""], ["x"] * 17, ["y" * 600]],
}


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _malformed(path: str) -> list[Case]:
    raw = [b"", b"{", b"[]", b"null", b"123", b'"str"', b"\xff\xfe{}", b"{'a': 1}", b'{"messages": [}',
           b'{"prompt": "x",}', b"[" * 5000 + b"]" * 5000, b'{"temperature": NaN, "prompt": "x"}',
           b'{"a": 1} trailing', b"\x00" * 16]
    return [Case(f"malformed {k} {path}", path, b) for k, b in enumerate(raw)]


def _field_cases(path: str, base: dict, fields: dict, tag: str) -> list[Case]:
    return [Case(f"{tag} {path} {f}={v!r}"[:120], path, _j({**base, f: v}))
            for f, values in fields.items() for v in values]


def chat_cases(vocab_size: int, max_total_len: int) -> list[Case]:
    base = {"model": "glm", "messages": MSG}
    bad_messages = [
        [], "hi", [{"content": "hi"}], [{"role": "wizard", "content": "hi"}], [{"role": 5, "content": "x"}],
        [{"role": "user", "content": 5}], [{"role": "user", "content": {"text": "x"}}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"text": "x"}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [5]}],
        [{"role": "tool", "content": None}], [{"role": "user", "content": "x", "tool_calls": [{"function": {}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}],
        [{"role": "user", "content": "x", "name": 5}], [None], [[]],
        [{"role": "user", "content": "word " * max_total_len}],
    ]
    cases = [Case(f"chat messages #{k}", CHAT, _j({**base, "messages": m})) for k, m in enumerate(bad_messages)]
    cases.append(Case("chat no messages", CHAT, _j({"model": "glm"})))
    extra_types = {"logprobs": ["yes", 1], "top_logprobs": ["2", 1.5], "tools": ["x", [5], [{"type": "function"}],
                   [{"function": {"name": 5}}]], "tool_choice": [5, ["auto"]], "chat_template_kwargs": ["x", [1]],
                   "max_completion_tokens": ["5"], "messages": [{"role": "user"}]}
    extra_range = {"top_logprobs": [-1, 21], "max_completion_tokens": [0, -1, 10**9],
                   "tool_choice": ["required", "sometimes", {"type": "function", "function": {"name": "f"}}],
                   "chat_template_kwargs": [{"messages": []}, {"add_generation_prompt": False, "tools": []}],
                   "tools": [[{"type": "retrieval", "function": {"name": "f"}}]],
                   "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}]}
    cases += _field_cases(CHAT, base, {**WRONG_TYPES, **extra_types}, "type")
    cases += _field_cases(CHAT, base, {**OUT_OF_RANGE, **extra_range}, "range")
    cases.append(Case("chat top_logprobs without logprobs", CHAT, _j({**base, "top_logprobs": 2})))
    cases.append(Case("chat max_tokens too long for context", CHAT, _j({**base, "max_tokens": max_total_len})))
    return cases


def completion_cases(vocab_size: int, max_total_len: int) -> list[Case]:
    base = {"model": "glm", "prompt": "hi"}
    bad_prompts = ["", [], [""], [[]], [1, "a"], [[1], "a"], [-1], [vocab_size], [[1, 2], [vocab_size + 5]],
                   [1.5], [True], None, {"text": "x"}, 5, [[1, [2]]], ["x"] * 20, "word " * max_total_len,
                   list(range(max_total_len))]
    cases = [Case(f"completions prompt #{k}", COMP, _j({**base, "prompt": p})) for k, p in enumerate(bad_prompts)]
    cases.append(Case("completions no prompt", COMP, _j({"model": "glm"})))
    extra_types = {"logprobs": ["2", 1.5, True], "echo": ["yes"], "suffix": [5], "best_of": ["2"],
                   "return_token_ids": ["yes"]}
    extra_range = {"logprobs": [-1, 21], "suffix": ["tail"], "best_of": [3], "max_tokens": [max_total_len]}
    cases += _field_cases(COMP, base, {**WRONG_TYPES, **extra_types}, "type")
    cases += _field_cases(COMP, base, {**OUT_OF_RANGE, **extra_range}, "range")
    cases.append(Case("completions echo with logprobs", COMP, _j({**base, "echo": True, "logprobs": 1})))
    cases.append(Case("completions prompts x n too many", COMP, _j({**base, "prompt": ["a"] * 8, "n": 4})))
    return cases


def generate_cases(vocab_size: int, max_total_len: int) -> list[Case]:
    cases = []
    params_bad = {
        "max_new_tokens": [0, -1, "5", 10**9, 1.5], "temperature": [-1, "x"], "top_p": [0, 2, "x"],
        "top_k": [0, -5, "x"], "frequency_penalty": [5, "x"], "presence_penalty": [-5], "repetition_penalty": [0, -1],
        "stop": [5, [""], ["x"] * 17], "ignore_eos": ["x"], "do_sample": ["yes", 2], "seed": [-1, "x"],
        "min_p": [2], "stop_sequences": [7],
    }
    for path in (GEN, "/generate_stream"):
        base = {"inputs": "hi"}
        for f, values in params_bad.items():
            cases += [Case(f"{path} parameters.{f}={v!r}"[:120], path, _j({**base, "parameters": {f: v}}))
                      for v in values]
        for k, b in enumerate([{"inputs": ""}, {"inputs": 5}, {"inputs": ["a"]}, {}, {"parameters": {}},
                               {"inputs": "hi", "parameters": "x"}, {"inputs": "word " * max_total_len},
                               {"inputs": "x", "parameters": {"stop": "a", "stop_sequences": "b"}}]):
            cases.append(Case(f"{path} body #{k}", path, _j(b)))
    return cases


def other_cases(body_limit: int) -> list[Case]:
    giant = _j({"model": "glm", "prompt": "x" * (body_limit + 10)})
    cases = [Case(f"giant body {p}", p, giant, status=413) for p in (CHAT, COMP, GEN)]
    cases += [Case(f"GET {p}", p, b"", method="GET", status=405) for p in (CHAT, COMP, GEN)]
    cases += [Case("unknown path", "/v1/engines", b"{}", status=404), Case("DELETE models", "/v1/models", b"",
                                                                           method="DELETE", status=405)]
    for p in (CHAT, COMP, GEN):
        cases += _malformed(p)
    return cases


def corpus(vocab_size: int, max_total_len: int, body_limit: int) -> list[Case]:
    return (chat_cases(vocab_size, max_total_len) + completion_cases(vocab_size, max_total_len)
            + generate_cases(vocab_size, max_total_len) + other_cases(body_limit))
