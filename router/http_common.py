"""HTTP plumbing shared by the endpoints: bounded body reading, JSON/SSE responses, ids,
collecting a whole generation while watching for a client disconnect.

Runs in the router process.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from glmserve.router.errors import APIError, bad, from_msgspec
from glmserve.router.generation import ChoiceStream, Delta, merged
from glmserve.shared.tokenizer.ids_only import NoTokenizerError

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Chat-template rendering and tokenization run here, not on the event loop: a 4 MB prompt takes
# seconds to encode (the Rust tokenizer releases the GIL), and the loop serves every stream.
_PLAN_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="router-plan")


async def off_loop(fn: Callable[..., T], *args) -> T:
    """fn(*args) on the router's planning threads; its exceptions (APIError: 4xx) propagate."""
    return await asyncio.get_running_loop().run_in_executor(_PLAN_POOL, functools.partial(fn, *args))


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, at most `limit` bytes (413 beyond, checked before reading when declared),
    whole within `timeout_s` (408 after: a client trickling its body holds no worker, only a socket)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise APIError(f"the request body was not received within {timeout_s:.0f} s", 408,
                       code="body_timeout") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"request body of {declared} bytes exceeds the limit of {limit}", 413,
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(f"request body exceeds the limit of {limit} bytes", 413, code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError("client disconnected while sending the body", 400) from None
    return b"".join(chunks)


def decode_json(body: bytes, typ: type[T]) -> T:
    if not body.strip():
        raise bad("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.MsgspecError as e:  # (nesting past ~1000 levels raises RecursionError: guarded's 400)
        raise from_msgspec(e) from None


def json_response(obj: dict, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


# Characters that JSON may leave raw but that line readers treating text like str.splitlines
# (httpx's iter_lines among them) take as line breaks, cutting an event's JSON in two.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` on one line, whatever text the tokens decode to."""
    payload = obj if isinstance(obj, str) else msgspec.json.encode(obj).decode()
    return f"data: {payload.translate(_LINE_BREAKS)}\n\n".encode()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def error_event(err: APIError) -> bytes:
    return sse(err.body())


async def collect(request: Request, streams: list[ChoiceStream]) -> list[list[Delta]]:
    """Every delta of every choice (by index), aborting the runs if the client goes away."""
    out: list[list[Delta]] = [[] for _ in streams]
    index_of = {s.index: k for k, s in enumerate(streams)}

    async def consume() -> None:
        async for d in merged(streams):
            out[index_of[d.index]].append(d)

    task = asyncio.create_task(consume())
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:  # client went away: cancelling `task` aborts the runs
            task.cancel()
            raise APIError("client disconnected", 499, code="client_closed")
        task.result()
    finally:
        watcher.cancel()
        task.cancel()
    return out


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def guarded(fn: Callable) -> Callable:
    """Endpoint wrapper: APIError -> its JSON response; NoTokenizerError, RecursionError -> 400."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except APIError as e:
            return e.response()
        except NoTokenizerError as e:  # text in or out, and the model has no tokenizer
            return APIError(str(e), 400, code="no_tokenizer").response()
        except RecursionError:  # a request nested deeper than what walks it (msgspec: ~1000 levels)
            return bad("the request nests too deeply", code="invalid_json").response()

    endpoint.__name__ = fn.__name__
    return endpoint
