"""Arrival schedules, the concurrency cap and the named workloads (benchmark client's asyncio loop).

Open loop: inter-arrival gaps drawn from a gamma distribution with shape `burstiness` and mean
1/rate (burstiness 1 = Poisson), as vLLM does; rate inf sends everything at once. A concurrency
cap (`--max-concurrency`) holds a request back until one of the in-flight ones finishes.
Workloads of the seeds: burst (all at once), high-conc (cap 512, all queued at once),
moderate (Poisson 10 req/s), steady (Poisson 5 req/s).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm.asyncio import tqdm

from bench.sharegpt.client import RequestConfig, RequestOutput, send_request
from bench.sharegpt.datasets import SampleRequest
from bench.sharegpt.text import TokenCounter


@dataclass(frozen=True)
class LoadShape:
    request_rate: float = math.inf  # req/s; inf = all at once
    max_concurrency: int | None = None
    burstiness: float = 1.0

    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate={rate},conc={self.max_concurrency or 'none'}"


WORKLOADS: dict[str, LoadShape] = {
    "burst": LoadShape(math.inf, None),
    "high-conc": LoadShape(math.inf, 512),
    "moderate": LoadShape(10.0, None),
    "steady": LoadShape(5.0, None),
}


def arrival_offsets(num: int, shape: LoadShape, seed: int) -> list[float]:
    """Send time of each request in seconds after the start (non-decreasing, first is 0)."""
    if math.isinf(shape.request_rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    theta = 1.0 / (shape.request_rate * shape.burstiness)
    gaps = rng.gamma(shape.burstiness, theta, size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


@dataclass
class RunResult:
    outputs: list[RequestOutput]
    duration: float


async def _run(
    cfg: RequestConfig, requests: list[SampleRequest], shape: LoadShape, counter: TokenCounter,
    seed: int, progress: bool, timeout_s: float,
) -> RunResult:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        sem = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
        pbar = tqdm(total=len(requests), disable=not progress, desc=shape.label())

        async def one(req: SampleRequest, at: float, t0: float) -> RequestOutput:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            if sem is None:
                out = await send_request(client, cfg, req, counter)
            else:
                async with sem:
                    out = await send_request(client, cfg, req, counter)
            pbar.update(1)
            return out

        offsets = arrival_offsets(len(requests), shape, seed)
        t0 = time.perf_counter()
        outputs = await asyncio.gather(*(one(r, a, t0) for r, a in zip(requests, offsets)))
        duration = time.perf_counter() - t0
        pbar.close()
    for o in outputs:
        o.start_time -= t0  # seconds after the run began (never before the request's arrival offset)
    return RunResult(list(outputs), duration)


async def warmup(cfg: RequestConfig, req: SampleRequest, counter: TokenCounter, timeout_s: float) -> RequestOutput:
    """One request before the measured run; its failure stops the benchmark with the server's error."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
        short = SampleRequest(req.prompt, req.prompt_len, min(req.expected_output_len, 8), req.prompt_ids)
        return await send_request(client, cfg, short, counter)


def run_load(
    cfg: RequestConfig, requests: list[SampleRequest], shape: LoadShape, counter: TokenCounter,
    seed: int = 0, progress: bool = True, timeout_s: float = 6 * 3600,
) -> RunResult:
    return asyncio.run(_run(cfg, requests, shape, counter, seed, progress, timeout_s))
