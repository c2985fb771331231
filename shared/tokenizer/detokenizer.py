"""Incremental detokenization with stop strings, for streaming responses.

Runs in the router process, one object per request. `add(ids)` takes any number of new ids
(MTP delivers several per step) and returns only text that is final:
  * never part of a multi-byte UTF-8 character: a window whose decoding ends in U+FFFD
    (an incomplete byte sequence) is held until the character completes (or `finish()`);
  * never text that could be the start of a stop string: the longest suffix that is a proper
    prefix of some stop string is held back;
  * on a stop string, the text before its first occurrence is released, `stopped` becomes
    True, `stop_str` names it, and later calls return "".
Invariant: released text + held text == decode(all ids) once the window is complete.
"""
from typing import Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # all text released so far
        self.stopped = False
        self.stop_str: str | None = None
        # Decoding window: ids[prefix_offset:read_offset] is context whose text is released;
        # `_window_emitted` chars of the text after that context went to `_held`/`text` already.
        self._prefix_offset = 0
        self._read_offset = 0
        self._window_emitted = 0
        self._held = ""  # decoded text not yet released (possible stop-string prefix)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_chars(self, final: bool) -> str:
        """Characters decoded since the last call that are complete (all of them when `final`)."""
        context = self._decode(self.ids[self._prefix_offset:self._read_offset])
        tail = self._decode(self.ids[self._prefix_offset:])[len(context):]
        stable = tail if final else tail.rstrip(_REPLACEMENT)
        new = stable[self._window_emitted:]
        if stable == tail:  # window complete: slide it, keeping the last ids as context
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._window_emitted = 0
        else:
            self._window_emitted = len(stable)
        return new

    def _release(self, final: bool) -> str:
        """Move text from `_held` to the output, keeping back a possible stop-string prefix."""
        hits = [(self._held.find(s), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, self.stop_str = min(hits)
            out, self._held, self.stopped = self._held[:index], "", True
        else:
            keep = 0 if final else self._partial_stop_len(self._held)
            out = self._held[:len(self._held) - keep]
            self._held = self._held[len(self._held) - keep:]
        self.text += out
        return out

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add(self, ids: Sequence[int]) -> str:
        """Append new token ids; return the newly final text ("" once stopped)."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        self._held += self._new_chars(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation (EOS / length): flush held text and incomplete bytes (as U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._new_chars(final=True)
        return self._release(final=True)
