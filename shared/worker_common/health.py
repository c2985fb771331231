"""/healthz, /readyz and /metrics of one worker leader, served from a daemon thread.

- /healthz: 200 while the process is alive (the HTTP thread answers).
- /readyz: 200 only while `ready()` is true (weights loaded, links up, accepting work),
  else 503 with the reason `ready()` gives.
- /metrics: Prometheus text from the worker's registry.
The callbacks run on the HTTP thread: they must only read plain attributes.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

ReadyFn = Callable[[], tuple[bool, str]]  # (ready, reason when not)


class HealthServer:
    def __init__(self, port: int, ready: ReadyFn, metrics: Callable[[], bytes], host: str = "127.0.0.1"):
        handler = _make_handler(ready, metrics)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(ready: ReadyFn, metrics: Callable[[], bytes]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok, why = ready()
                self._send(200 if ok else 503, (b"ready\n" if ok else f"not ready: {why}\n".encode()), "text/plain")
            elif path == "/metrics":
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep worker logs quiet
            pass

    return Handler
