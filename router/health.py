"""Router health and operations endpoints: /healthz, /readyz, /metrics, /health_generate,
/v1/models, /workers.

Runs in the router process. /readyz is 200 only while >= 1 prefill and >= 1 decode worker
are ready (fresh heartbeat saying ready). /health_generate runs a real one-token greedy
generation through prefill -> decode and answers 200 only when a token came back.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from glmserve.router.errors import APIError
from glmserve.router.generation import merged, start_choices
from glmserve.router.http_common import json_response, new_id
from glmserve.router.state import RouterState
from glmserve.router.validate import TextOptions
from glmserve.shared.protocol import SamplingParams
from glmserve.shared.tokenizer.ids_only import IdsOnlyTokenizer

HEALTH_GENERATE_TIMEOUT_S = 30.0


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    ok, why = request.app.state.router.dispatcher.readiness()
    return PlainTextResponse(("ready: " if ok else "not ready: ") + why + "\n", status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    st: RouterState = request.app.state.router
    now = time.monotonic()
    for wid, w in st.dispatcher.registry.workers.items():
        st.metrics.worker_ready.labels(wid, w.role).set(1 if w.ready(now, st.cfg.heartbeat_timeout_s) else 0)
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def workers(request: Request) -> Response:
    st: RouterState = request.app.state.router
    return json_response({"workers": st.dispatcher.registry.summary(time.monotonic()),
                          "queue_depth": len(st.dispatcher.queue), "inflight_runs": len(st.dispatcher.runs)})


async def models(request: Request) -> Response:
    st: RouterState = request.app.state.router
    card = {"id": st.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "glmserve",
            "max_model_len": st.cfg.max_req_total_len}
    return json_response({"object": "list", "data": [card]})


async def health_generate(request: Request) -> Response:
    st: RouterState = request.app.state.router
    prompt = [0] if isinstance(st.tokenizer, IdsOnlyTokenizer) else st.tokenizer.encode("ping") or [0]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    t0 = time.monotonic()
    try:
        streams = start_choices(st.dispatcher, st.metrics, st.tokenizer, new_id("health"), [prompt],
                                lambda i: sampling, 1, TextOptions())
        tokens = await asyncio.wait_for(_count_tokens(streams), HEALTH_GENERATE_TIMEOUT_S)
    except APIError as e:
        return json_response({"ok": False, "error": e.message}, 503)
    except asyncio.TimeoutError:
        return json_response({"ok": False, "error": f"no token within {HEALTH_GENERATE_TIMEOUT_S:.0f} s"}, 503)
    ok = tokens >= 1
    return json_response({"ok": ok, "tokens": tokens, "seconds": round(time.monotonic() - t0, 4)},
                         200 if ok else 503)


async def _count_tokens(streams) -> int:
    count = 0
    async for d in merged(streams):
        count += len(d.token_ids)
    return count
