"""OpenAI-style errors of the router: `{"error": {"message", "type", "param", "code"}}`.

Runs in the router process. Every failure a client can cause is an `APIError` with a 4xx
status; worker-side failures are 5xx-class with a clear message (503 when no worker is ready).
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_ or _default_type(status)
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(msgspec.json.encode(self.body()), status_code=self.status,
                        media_type="application/json", headers=self.headers)


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    if status in (401, 403):
        return "authentication_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


def overloaded(queued: int) -> APIError:
    return APIError(f"the server is overloaded ({queued} requests queued); retry later", 429,
                    code="queue_full", headers={"Retry-After": "1"})


def from_msgspec(e: msgspec.MsgspecError) -> APIError:
    """Turn a msgspec decode/validation error into a 400 naming the field (`$.messages[0].role`)."""
    text = str(e)
    param = None
    if " - at `$" in text:
        text, _, path = text.partition(" - at `")
        param = path.rstrip("`").removeprefix("$").lstrip(".") or None
    if isinstance(e, msgspec.ValidationError):
        return bad(f"Invalid request: {text}" + (f" (at {param})" if param else ""), param=param)
    return bad(f"Malformed JSON body: {text}", code="invalid_json")
