"""The router's HTTP/1.1 protocol: uvicorn's httptools parser with a bound on the request head.

Runs in the router process (uvicorn's uvloop event loop). httptools (llhttp) and uvloop handle a
streamed response with less Python per event than h11 and asyncio: measured on the CPU fleet, router
CPU per streamed token 115 -> 92-96 us (bench/README.md, "Router CPU per token"). h11 bounds a
request's line + headers (uvicorn's h11_max_incomplete_event_size); httptools has no such bound, so
this subclass adds one:
a head that has not completed within MAX_HEAD_BYTES is answered 400 and its connection closed, as
h11 does. Bytes are counted only over data_received calls that begin and end inside a head (or
before one) and complete none: a call in which a head completes (a whole request can arrive in one
read) or which carries body bytes resets the count, so a large body never counts, and what a client
can make the parser buffer is the bound plus one read.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # the router's bound under h11 before (request line + headers)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _in_head = True  # waiting for, or inside, a request head
    _head_bytes = 0  # bytes of the current head (or of the wait before it) seen so far
    _head_done = False  # a head completed during the current data_received call

    def data_received(self, data: bytes) -> None:
        was_in_head, self._head_done = self._in_head, False
        super().data_received(data)
        if not (was_in_head and self._in_head) or self._head_done:  # a whole request can fit in one read
            self._head_bytes = 0
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self.logger.warning("request head over %d bytes: connection closed", MAX_HEAD_BYTES)
            self.send_400_response("Request head too large.")

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_done = False, True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True  # the next request's head (keep-alive) starts after this
        super().on_message_complete()
