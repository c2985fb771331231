"""Server-sent events stay one line per event whatever text the tokens decode to."""

from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from glmserve.router.http_common import sse


def test_unicode_line_separators_do_not_split_an_event():
    text = "a\u2028b\u2029c\x85d\ne\rf"  # httpx's iter_lines (like str.splitlines) breaks at all of these
    lines = [ln for ln in LineDecoder().decode(sse({"text": text}).decode()) if ln]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"text": text}
