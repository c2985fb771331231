"""Request bodies of the router's HTTP API as msgspec Structs (decoding = type validation).

Runs in the router process. Types are checked by msgspec while decoding; ranges and
cross-field rules are checked in `router.validate`. Unknown fields are accepted and ignored
(OpenAI clients send fields this server does not use). Responses are built as plain dicts
in the endpoint modules.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ToolFunction(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: ToolFunction


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    # a string, a list of content parts ({"type": "text", "text": ...}), or null
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by chat and completions (OpenAI names plus vLLM/SGLang extras)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None


class ChatRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # a string, a list of strings, a list of token ids, or a list of lists of token ids
    prompt: str | list[Any]
    max_tokens: int | None = None
    logprobs: int | None = None  # number of top logprobs per token (0 = sampled token only)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    return_token_ids: bool = False


class GenerateParameters(msgspec.Struct, kw_only=True):
    """LightLLM's `parameters` object."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_sequences: str | list[str] | None = None
    ignore_eos: bool = False
    do_sample: bool = False  # LightLLM: false = greedy
    seed: int | None = None
    skip_special_tokens: bool = True
    return_details: bool = False


class GenerateRequest(msgspec.Struct, kw_only=True):
    inputs: str
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False
