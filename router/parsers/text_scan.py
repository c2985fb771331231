"""Small text-scanning helpers for the streaming parsers (router process).

All parsers hold back a buffer tail that could still become a tag, so a tag split across
deltas (one character at a time, or MTP's multi-token chunks) is recognised the same way as
a whole one.
"""


def earliest(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    """(index, tag) of the first occurrence of any tag in `text`; (-1, "") when none occurs."""
    best, found = -1, ""
    for tag in tags:
        i = text.find(tag)
        if i >= 0 and (best < 0 or i < best or (i == best and len(tag) > len(found))):
            best, found = i, tag
    return best, found


def partial_tail(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some tag."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


def is_proper_prefix(text: str, tags: tuple[str, ...]) -> bool:
    """True when `text` is non-empty and could still grow into one of `tags`."""
    return bool(text) and any(len(text) < len(tag) and tag.startswith(text) for tag in tags)


class Field:
    """One text field of the message with GLM's whitespace rules, emitting into a DeltaSink.

    `strip_start`: whitespace at the start of the field (or after `restart()`) is dropped.
    Trailing whitespace is held until more text follows: `boundary()` drops it (a tag follows),
    `flush()` emits it (end of output) unless `strip_end`.
    """

    def __init__(self, sink, name: str, strip_start: bool, strip_end: bool):
        self._sink, self.name = sink, name
        self._strip_start, self._strip_end = strip_start, strip_end
        self._at_start = strip_start
        self._pending_ws = ""

    def push(self, text: str) -> None:
        if self._at_start:
            text = text.lstrip()
            if not text:
                return
            self._at_start = False
        body = text.rstrip()
        if body:
            self._sink.text(self.name, self._pending_ws + body)
            self._pending_ws = ""
        self._pending_ws += text[len(body):]

    def boundary(self) -> None:
        self._pending_ws = ""

    def restart(self) -> None:
        """A tag ended here: drop held whitespace and whitespace that follows."""
        self._pending_ws = ""
        self._at_start = True

    def flush(self) -> None:
        if not self._strip_end:
            self._sink.text(self.name, self._pending_ws)
        self._pending_ws = ""
