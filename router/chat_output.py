"""Per-choice chat output parsing: splits generated text into content, reasoning_content
and tool calls, using `router.parsers` (the parsers part) when it is available.

Runs in the router process. The interface the chat endpoint uses is `OutputParser`
(`feed(text) -> ParsedDelta`, `finish() -> ParsedDelta`); `make_parser` adapts the parsers
part's `ChatOutputParser` to it, or returns a pass-through (all text is content) when no
parser is configured or the module is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    # OpenAI streaming tool-call deltas: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}
    tool_calls: list[dict] = field(default_factory=list)


class OutputParser(Protocol):
    def feed(self, text: str) -> ParsedDelta: ...

    def finish(self) -> ParsedDelta: ...


class PassThrough:
    def feed(self, text: str) -> ParsedDelta:
        return ParsedDelta(content=text)

    def finish(self) -> ParsedDelta:
        return ParsedDelta()


class _Adapter:
    """Wraps the parsers part's ChatOutputParser, whose deltas may be objects or dicts."""

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    def _convert(d) -> ParsedDelta:
        if d is None:
            return ParsedDelta()
        get = d.get if isinstance(d, dict) else (lambda k, default=None: getattr(d, k, default))
        calls = [c if isinstance(c, dict) else _call_dict(c) for c in (get("tool_calls") or [])]
        return ParsedDelta(content=get("content") or "", reasoning=get("reasoning_content") or get("reasoning") or "",
                           tool_calls=calls)

    def feed(self, text: str) -> ParsedDelta:
        return self._convert(self.inner.feed(text))

    def finish(self) -> ParsedDelta:
        return self._convert(self.inner.finish())


def _call_dict(c) -> dict:
    to_builtins = getattr(c, "to_dict", None)
    if to_builtins is not None:
        return to_builtins()
    import msgspec

    return msgspec.to_builtins(c)


def make_parser(tool_call_parser: str | None, reasoning_parser: str | None, tools: list[dict] | None,
                enable_thinking: bool, tokenizer) -> OutputParser:
    if tool_call_parser is None and reasoning_parser is None:
        return PassThrough()
    try:
        from router.parsers import ChatOutputParser
    except ImportError:
        log.warning("router.parsers is not available: output is returned unparsed")
        return PassThrough()
    inner = ChatOutputParser(tool_call_parser=tool_call_parser if tools else None,
                             reasoning_parser=reasoning_parser, tools=tools,
                             enable_thinking=enable_thinking)
    return _Adapter(inner)
