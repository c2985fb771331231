"""The router's Starlette app: routes, startup/shutdown of the dispatcher, error handlers.

Runs in the router process. `build_app(cfg)` is what `python -m glmserve.router` serves and what
tests serve on a real uvicorn socket. Any exception that escapes an endpoint is logged and
answered as an OpenAI-style error (a 500 here is a bug, never a client's fault).
"""

from __future__ import annotations

import contextlib
import logging
import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from glmserve.router import api_chat, api_completions, api_generate, health
from glmserve.router.config import RouterConfig
from glmserve.router.dispatch import Dispatcher
from glmserve.router.errors import APIError
from glmserve.router.http_common import guarded
from glmserve.router.metrics import RouterMetrics
from glmserve.router.state import RouterState

log = logging.getLogger(__name__)


def load_router_tokenizer(cfg: RouterConfig):
    """The checkpoint's tokenizer; a model dir without tokenizer.json (and no --tokenizer) serves
    token-id requests only (IdsOnlyTokenizer) rather than exiting into a supervisord restart loop."""
    from glmserve.shared.tokenizer import load_tokenizer
    from glmserve.shared.tokenizer.ids_only import IdsOnlyTokenizer

    if cfg.tokenizer is None and cfg.model_dir is not None and not os.path.isfile(
            os.path.join(cfg.model_dir, "tokenizer.json")):
        reason = f"no tokenizer.json in {cfg.model_dir}"
        log.warning("%s: serving token-id requests only (prompt as ids, return_token_ids); text prompts and "
                    "chat get a 400. Pass --tokenizer DIR to serve text.", reason)
        return IdsOnlyTokenizer(cfg.model_dir, reason)
    return load_tokenizer(cfg.model_dir, cfg.tokenizer)


def _counted(endpoint_name: str, fn, metrics: RouterMetrics):
    inner = guarded(fn)

    async def endpoint(request: Request):
        metrics.inflight.inc()
        try:
            resp = await inner(request)
        except BaseException:
            metrics.inflight.dec()
            raise
        metrics.requests.labels(endpoint_name, str(resp.status_code)).inc()
        if isinstance(resp, StreamingResponse):  # in flight until the stream ends
            resp.body_iterator = _dec_after(resp.body_iterator, metrics)
        else:
            metrics.inflight.dec()
        return resp

    return endpoint


async def _dec_after(body, metrics: RouterMetrics):
    try:
        async for chunk in body:
            yield chunk
    finally:
        metrics.inflight.dec()


def build_app(cfg: RouterConfig, tokenizer=None) -> Starlette:
    metrics = RouterMetrics()
    dispatcher = Dispatcher(cfg, metrics)
    state = RouterState(cfg, tokenizer if tokenizer is not None else load_router_tokenizer(cfg), dispatcher, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await dispatcher.start()
        log.info("router ready to accept requests; workers: prefill %s decode %s", cfg.prefill, cfg.decode)
        yield
        await dispatcher.stop()

    gen = {"/v1/chat/completions": api_chat.chat_completions, "/v1/completions": api_completions.completions,
           "/generate": api_generate.generate, "/generate_stream": api_generate.generate_stream}
    routes = [Route(path, _counted(path, fn, metrics), methods=["POST"]) for path, fn in gen.items()]
    for path, fn in {"/healthz": health.healthz, "/health": health.healthz, "/readyz": health.readyz,
                     "/metrics": health.metrics, "/v1/models": health.models, "/workers": health.workers,
                     "/health_generate": health.health_generate}.items():
        routes.append(Route(path, guarded(fn), methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.router = state
    return app


async def _http_error(request: Request, exc: HTTPException):
    return APIError(exc.detail or "error", exc.status_code).response()


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return APIError(f"internal error: {type(exc).__name__}", 500).response()
