"""OpenAI chat-completion deltas: a coalescing sink and the merge of deltas into a message.

Runs in the router process. A delta is a plain dict shaped like OpenAI's `choices[].delta`:
  {"content": str} | {"reasoning_content": str}
  | {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}  (a call's first)
  | {"tool_calls": [{"index", "function": {"arguments": str}}]}                              (its later parts)
Invariant: for each index, the first delta carries id and name exactly once; `arguments`
fragments concatenate to the final JSON object text.
"""
import json
from typing import Any


class DeltaSink:
    """Collects deltas, merging consecutive ones of the same kind so each `take()` is compact."""

    def __init__(self) -> None:
        self._deltas: list[dict[str, Any]] = []

    def text(self, field: str, text: str) -> None:
        if not text:
            return
        last = self._deltas[-1] if self._deltas else None
        if last is not None and list(last) == [field]:
            last[field] += text
        else:
            self._deltas.append({field: text})

    def call_start(self, index: int, call_id: str, name: str) -> None:
        call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        self._deltas.append({"tool_calls": [call]})

    def call_args(self, index: int, fragment: str) -> None:
        if not fragment:
            return
        last = self._deltas[-1] if self._deltas else None
        if last is not None and "tool_calls" in last and last["tool_calls"][0]["index"] == index:
            last["tool_calls"][0]["function"]["arguments"] += fragment
        else:
            self._deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def take(self) -> "DeltaBatch":
        out, self._deltas = DeltaBatch(self._deltas), []
        return out


class DeltaBatch(list):
    """The deltas of one `feed()` / `finish()` call (a list), also readable as ONE merged delta.

    `content`, `reasoning_content` and `tool_calls` give the batch folded into a single OpenAI
    delta (one SSE chunk): texts concatenated, each call's parts merged (first part keeps id and
    name). Merging loses only the order between fields, which OpenAI clients do not use.
    """

    @property
    def content(self) -> str:
        return "".join(d.get("content", "") for d in self)

    @property
    def reasoning_content(self) -> str:
        return "".join(d.get("reasoning_content", "") for d in self)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        parts: dict[int, dict[str, Any]] = {}
        for delta in self:
            for part in delta.get("tool_calls", []):
                if part["index"] not in parts:
                    parts[part["index"]] = {**part, "function": dict(part["function"])}
                else:
                    parts[part["index"]]["function"]["arguments"] += part["function"].get("arguments", "")
        return [parts[i] for i in sorted(parts)]

    def merged(self) -> dict[str, Any]:
        """The batch as one delta dict (keys only for non-empty fields)."""
        out: dict[str, Any] = {}
        for key, value in (("reasoning_content", self.reasoning_content), ("content", self.content),
                           ("tool_calls", self.tool_calls)):
            if value:
                out[key] = value
        return out


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the deltas add up to (content / reasoning None when empty)."""
    content, reasoning, calls = [], [], {}
    for delta in deltas:
        content.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            if part.get("id"):
                call["id"] = part["id"]
            function = part.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None,
                               "reasoning_content": "".join(reasoning) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def message_json(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)
