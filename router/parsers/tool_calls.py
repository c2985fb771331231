"""Streaming state machine for one GLM tool call, from after `<tool_call>` to `</tool_call>`.

Runs in the router process, driven by `chat.ChatOutputParser`. Accepts both formats (like
vLLM >= 0.33, `glm45` and `glm47` share it):
  glm45: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n...</tool_call>`
  glm47: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`
with any whitespace between tags, zero-argument calls (`<tool_call>NAME</tool_call>`).

Emission (into the DeltaSink), so that fragments always concatenate to valid JSON:
  * header (index, id, name) once, when the name region closes and the name is allowed;
  * `{"key": ` + `"` + escaped chunks as they arrive + `"` for string-typed arguments;
  * `{"key": value` whole at `</arg_value>` for every other type; `, ` between arguments;
  * `}` (or `{}`) at `</tool_call>`.
Malformed text: before the header the whole call text is returned as content (the call is not
emitted); after it the call is closed at its last complete argument and the text of the broken
argument is returned as content. Never an exception.
"""
import json
from dataclasses import dataclass

from glmserve.router.parsers.schema import STRING_ONLY, ToolSchemas, decode_value
from glmserve.router.parsers.text_scan import is_proper_prefix, partial_tail

MAX_NAME_LEN = 256
NAME, ARGS, KEY, AFTER_KEY, VALUE = "name", "args", "key", "after_key", "value"


@dataclass
class Step:
    """What one `step` did: `consumed` chars of the buffer; `outcome` None | "done" | "malformed"."""

    consumed: int
    outcome: str | None = None
    raw: str = ""  # text to return as content when malformed


class ToolCallMachine:
    def __init__(self, sink, schemas: ToolSchemas, index: int, call_id: str):
        self._sink, self._schemas = sink, schemas
        self.index, self._call_id = index, call_id
        self.state = NAME
        self.committed = False  # header emitted
        self._name = ""
        self._num_args = 0
        self._key = ""
        self._stream_value = False  # current value is string-typed and streamed
        self._value = ""  # buffered text of a non-streamed value
        self._unit_raw = "<tool_call>"  # text of the unit (call before commit, else the argument) so far

    def step(self, buf: str, final: bool) -> Step:
        """Consume from `buf`; Step(0) means: wait for more text."""
        handler = {NAME: self._name_step, ARGS: self._args_step, KEY: self._key_step,
                   AFTER_KEY: self._after_key_step, VALUE: self._value_step}[self.state]
        return handler(buf, final)

    def finish(self, buf: str) -> Step:
        """End of output inside the call: truncated, so close it (or give it back as content)."""
        if self.state == VALUE and self._stream_value:
            self._sink.call_args(self.index, json.dumps(buf, ensure_ascii=False)[1:-1] + '"')
            self._num_args += 1
            return self._close(len(buf), "malformed", raw="")
        self._eat(buf, len(buf))
        return self._malformed(len(buf))

    # -- states ---------------------------------------------------------------------------
    def _eat(self, buf: str, n: int) -> None:
        self._unit_raw += buf[:n]

    def _name_step(self, buf: str, final: bool) -> Step:
        stop = min((i for i in (buf.find("\n"), buf.find("<")) if i >= 0), default=-1)
        if stop < 0:
            self._name += buf
            self._eat(buf, len(buf))
            if len(self._name) > MAX_NAME_LEN or final:
                return self._malformed(len(buf))
            return Step(len(buf))
        self._name += buf[:stop]
        self._eat(buf, stop)
        if buf[stop] == "\n":
            self._eat(buf[stop:], 1)
            if not self._name.strip():  # newline before the name
                return Step(stop + 1)
            return self._commit(stop + 1)
        rest = buf[stop:]
        if rest.startswith(("<arg_key>", "</tool_call>")):
            return self._commit(stop)
        if is_proper_prefix(rest, ("<arg_key>", "</tool_call>")) and not final:
            return Step(stop)
        return self._malformed(stop)

    def _commit(self, consumed: int) -> Step:
        name = self._name.strip()
        if not name or not self._schemas.is_declared(name):
            return self._malformed(consumed)
        self._name, self.committed, self.state = name, True, ARGS
        self._sink.call_start(self.index, self._call_id, name)
        self._unit_raw = ""
        return Step(consumed)

    def _expect(self, buf: str, final: bool, tags: tuple[str, ...]) -> tuple[int, str | None, bool]:
        """Skip whitespace then match one of `tags`: (offset, tag or None, need_more)."""
        offset = len(buf) - len(buf.lstrip())
        rest = buf[offset:]
        for tag in tags:
            if rest.startswith(tag):
                return offset, tag, False
        need_more = not final and (not rest or is_proper_prefix(rest, tags))
        return offset, None, need_more

    def _args_step(self, buf: str, final: bool) -> Step:
        offset, tag, need_more = self._expect(buf, final, ("<arg_key>", "</tool_call>"))
        if tag is None:
            return Step(0) if need_more else self._malformed(0)
        self._eat(buf, offset + len(tag))
        if tag == "</tool_call>":
            return self._close(offset + len(tag), "done")
        self.state, self._key = KEY, ""
        return Step(offset + len(tag))

    def _key_step(self, buf: str, final: bool) -> Step:
        i = buf.find("<")
        if i < 0:
            if len(self._key) + len(buf) > MAX_NAME_LEN or final:
                return self._malformed(0)
            self._key += buf
            self._eat(buf, len(buf))
            return Step(len(buf))
        if buf[i:].startswith("</arg_key>"):
            self._key = (self._key + buf[:i]).strip()
            self._eat(buf, i + len("</arg_key>"))
            self.state = AFTER_KEY
            return Step(i + len("</arg_key>"))
        if is_proper_prefix(buf[i:], ("</arg_key>",)) and not final:
            return Step(0) if i == 0 else self._key_more(buf, i)
        return self._malformed(0)

    def _key_more(self, buf: str, i: int) -> Step:
        self._key += buf[:i]
        self._eat(buf, i)
        return Step(i)

    def _after_key_step(self, buf: str, final: bool) -> Step:
        offset, tag, need_more = self._expect(buf, final, ("<arg_value>",))
        if tag is None:
            return Step(0) if need_more else self._malformed(0)
        self._eat(buf, offset + len(tag))
        types = self._schemas.arg_types(self._name, self._key)
        self._stream_value, self._value, self.state = types == STRING_ONLY, "", VALUE
        if self._stream_value:
            self._sink.call_args(self.index, self._separator() + json.dumps(self._key, ensure_ascii=False) + ': "')
            self._unit_raw = ""  # from here on the argument belongs to the call
        return Step(offset + len(tag))

    def _value_step(self, buf: str, final: bool) -> Step:
        end = buf.find("</arg_value>")
        chunk_len = end if end >= 0 else len(buf) - (0 if final else partial_tail(buf, ("</arg_value>",)))
        chunk = buf[:chunk_len]
        if self._stream_value:
            self._sink.call_args(self.index, json.dumps(chunk, ensure_ascii=False)[1:-1])
        else:
            self._value += chunk
            self._eat(buf, chunk_len)
        if end < 0:
            return Step(chunk_len)
        if self._stream_value:
            self._sink.call_args(self.index, '"')
        else:
            value = decode_value(self._value, self._schemas.arg_types(self._name, self._key))
            self._sink.call_args(self.index, self._separator() + json.dumps(self._key, ensure_ascii=False)
                                 + ": " + json.dumps(value, ensure_ascii=False))
        self._num_args += 1
        self.state, self._unit_raw = ARGS, ""
        return Step(end + len("</arg_value>"))

    # -- endings ----------------------------------------------------------------------------
    def _separator(self) -> str:
        return "{" if self._num_args == 0 else ", "

    def _close(self, consumed: int, outcome: str, raw: str = "") -> Step:
        self._sink.call_args(self.index, "}" if self._num_args else "{}")
        return Step(consumed, outcome, raw)

    def _malformed(self, consumed: int) -> Step:
        """Give the unit's text (all consumed text is in it) back as content; close a started call."""
        raw = self._unit_raw
        if self.committed:
            return self._close(consumed, "malformed", raw)
        return Step(consumed, "malformed", raw)
