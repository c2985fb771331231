"""`ChatOutputParser`: splits a GLM completion into content, reasoning and tool calls, streaming.

Runs in the router process, one object per request (and per choice). Feed it the detokenized
text as it arrives (`feed(delta_text)` -> deltas, any split, e.g. one character or MTP's
multi-token chunks), then `finish()`. `parse_full(text)` is the same machine fed once, so
streaming and non-streaming give the same message by construction.

Reasoning (`reasoning_parser="glm45"`), spec §8:
  * thinking disabled (`enable_thinking=False`) or no reasoning parser: all text is content
    (think tags included, verbatim);
  * `prompt_ends_in_think=True` (GLM-4.7 prompt ends in `<think>`) or None (not known; what
    vLLM / SGLang assume): output starts as reasoning (an optional leading `<think>` dropped);
    False (GLM-4.5 prompt): reasoning only if the output opens with `<think>` (after whitespace);
  * in reasoning, `<think>` is dropped, `</think>` switches to content, and a `<tool_call>`
    (when tools are parsed) ends the reasoning and starts the call; output that ends inside
    the reasoning (no `</think>`) is all reasoning, content None;
  * reasoning is stripped; content is left-stripped where it starts after `</think>`.
Tool calls (`tool_call_parser` "glm45" | "glm47", see tool_calls.py) are parsed only when tools
were given and `tool_choice` is not "none". `tool_choice`:
  * "auto" / "required": every declared tool may be called; a named choice
    ({"type": "function", "function": {"name": N}}) allows N only;
  * calls to undeclared (or not allowed) tools and malformed call text come back as content;
  * "required" / named with no call in the output: the message is returned as it is and
    `missing_required_call` is True (the router decides; we never invent a call).
Whitespace between calls and after the last call is dropped.
"""
import uuid
from typing import Any

from glmserve.router.parsers.deltas import DeltaBatch, DeltaSink, merge_deltas
from glmserve.router.parsers.schema import ToolSchemas
from glmserve.router.parsers.text_scan import Field, earliest, is_proper_prefix, partial_tail
from glmserve.router.parsers.tool_calls import ToolCallMachine

TOOL_CALL_PARSERS = ("glm45", "glm47")
REASONING_PARSERS = ("glm45",)
START, REASONING, CONTENT, CALL = "start", "reasoning", "content", "call"


def normalize_parser_name(name: str | None, allowed: tuple[str, ...]) -> str | None:
    """'glm45', 'glm-45', 'glm-4.5', 'GLM4.5', 'glm4_moe' -> 'glm45'; None/'' -> None."""
    if not name:
        return None
    key = name.lower().replace("-", "").replace("_", "").replace(".", "")
    key = {"glm4moe": "glm45", "glm46": "glm45", "glm47moe": "glm47", "glm5": "glm47"}.get(key, key)
    if key not in allowed:
        raise ValueError(f"unknown parser {name!r}; choose from {', '.join(allowed)}")
    return key


def prompt_ends_in_think(prompt: str) -> bool:
    """True when the rendered prompt opens a think block (GLM-4.7 template, thinking on)."""
    return prompt.rstrip().endswith("<think>")


def thinking_enabled(chat_template_kwargs: dict | None) -> bool:
    """Whether the GLM templates think: off only when `enable_thinking` is given and falsy
    (the templates test `enable_thinking is defined and not enable_thinking`)."""
    kwargs = chat_template_kwargs or {}
    return not ("enable_thinking" in kwargs and not kwargs["enable_thinking"])


def _named_choice(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function") or {}
        return function.get("name") if isinstance(function, dict) else None
    return None


class ChatOutputParser:
    def __init__(self, tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 tools: list[dict] | None = None, tool_choice: Any = "auto", enable_thinking: bool = True,
                 prompt_ends_in_think: bool | None = None, call_id_prefix: str | None = None,
                 accept_undeclared_tools: bool = False):
        self.tool_call_parser = normalize_parser_name(tool_call_parser, TOOL_CALL_PARSERS)
        self.reasoning_parser = normalize_parser_name(reasoning_parser, REASONING_PARSERS)
        self._named = _named_choice(tool_choice)
        self._required = tool_choice == "required" or self._named is not None
        self._schemas = ToolSchemas(tools, only_name=self._named, accept_any=accept_undeclared_tools)
        self._parse_tools = bool(self.tool_call_parser and self._schemas and tool_choice != "none")
        self._call_id_prefix = call_id_prefix or f"call_{uuid.uuid4().hex[:16]}_"
        thinking = bool(self.reasoning_parser) and enable_thinking
        self._sink = DeltaSink()
        self._content = Field(self._sink, "content", strip_start=False, strip_end=False)
        self._reasoning = Field(self._sink, "reasoning_content", strip_start=True, strip_end=True)
        self._state = (START if prompt_ends_in_think is False else REASONING) if thinking else CONTENT
        self._buf = ""
        self._call: ToolCallMachine | None = None
        self._call_from_reasoning = False
        self.num_tool_calls = 0
        self.finished = False

    @property
    def missing_required_call(self) -> bool:
        return self._required and self.num_tool_calls == 0

    def feed(self, delta_text: str) -> DeltaBatch:
        """New deltas for the next piece of output text (holds back what could still be a tag)."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        self._run(final=False)
        return self._sink.take()

    def finish(self) -> DeltaBatch:
        """The last deltas: everything held back, truncated calls closed."""
        if not self.finished:
            self.finished = True
            self._run(final=True)
            if self._call is not None:
                self._end_call(self._call.finish(self._buf))
                self._buf = ""
                self._run(final=True)
            self._reasoning.flush()
            self._content.flush()
        return self._sink.take()

    def parse_full(self, text: str) -> dict:
        """The whole assistant message for a complete output (non-streaming)."""
        return merge_deltas(self.feed(text) + self.finish())

    # -- the state machine --------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        step = {START: self._start_step, REASONING: self._reasoning_step,
                CONTENT: self._content_step, CALL: self._call_step}
        while step[self._state](final):
            pass

    def _start_step(self, final: bool) -> bool:
        text = self._buf.lstrip()
        if text.startswith("<think>"):
            self._buf, self._state = text[len("<think>"):], REASONING
            return True
        if not final and (not text or is_proper_prefix(text, ("<think>",))):
            return False
        self._state = CONTENT  # GLM-4.5 answer without thinking: leading whitespace dropped
        self._content.restart()
        return True

    def _scan(self, field: Field, tags: tuple[str, ...], final: bool) -> str | None:
        """Emit text up to the first tag (returned) or up to a possible partial tag (None)."""
        index, tag = earliest(self._buf, tags)
        if index >= 0:
            field.push(self._buf[:index])
            self._buf = self._buf[index + len(tag):]
            return tag
        keep = 0 if final else partial_tail(self._buf, tags)
        field.push(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return None

    def _reasoning_step(self, final: bool) -> bool:
        tags = ("</think>", "<think>") + (("<tool_call>",) if self._parse_tools else ())
        tag = self._scan(self._reasoning, tags, final)
        if tag is None or tag == "<think>":
            return tag is not None
        if tag == "</think>":
            self._reasoning.boundary()
            self._state = CONTENT
            self._content.restart()
        else:
            self._start_call(from_reasoning=True)
        return True

    def _content_step(self, final: bool) -> bool:
        tags = ("<tool_call>",) if self._parse_tools else ()
        if not tags:
            self._content.push(self._buf)
            self._buf = ""
            return False
        tag = self._scan(self._content, tags, final)
        if tag is None:
            return False
        self._start_call(from_reasoning=False)
        return True

    def _start_call(self, from_reasoning: bool) -> None:
        index = self.num_tool_calls
        self._call = ToolCallMachine(self._sink, self._schemas, index, f"{self._call_id_prefix}{index}")
        self._call_from_reasoning = from_reasoning
        self._state = CALL

    def _call_step(self, final: bool) -> bool:
        assert self._call is not None
        result = self._call.step(self._buf, final)
        self._buf = self._buf[result.consumed:]
        if self._call.committed:  # whitespace before a real call is dropped
            self._content.boundary()
        if result.outcome is None:
            return result.consumed > 0
        self._end_call(result)
        return True

    def _end_call(self, result) -> None:
        """After `</tool_call>` or a malformed call: back to content (or reasoning, if nothing went out)."""
        call, self._call, self._state = self._call, None, CONTENT
        if call.committed:
            self.num_tool_calls += 1
        elif self._call_from_reasoning:  # not a call after all: the text stays reasoning
            self._state = REASONING
            self._reasoning.push(result.raw)
            return
        if result.raw:
            self._content.push(result.raw)
        else:
            self._content.restart()
