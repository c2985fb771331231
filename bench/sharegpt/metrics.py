"""Serving metrics computed from client records exactly as `vllm bench serve` (calculate_metrics) does.

Runs in the benchmark client. Per successful request: TTFT, ITL (every gap, pooled over requests),
E2E latency, and TPOT = (latency - ttft) / (output_tokens - 1) for output_tokens > 1 (a request with
one token has TPOT 0 for goodput and is left out of the TPOT statistics). Failed requests count
0 output tokens and add nothing else. Throughputs divide by the benchmark duration. Goodput counts
requests whose every stated SLO (ms) is >= the measured value. Peak output tok/s and peak
concurrency bucket each token time (start + ttft + cumulative itl) and each request's active
seconds into 1-second buckets from the first start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from bench.sharegpt.client import RequestOutput

METRIC_KEYS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class Stats:
    """One latency metric in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int  # vLLM's: most requests active within one 1-second bucket
    max_inflight_requests: int  # exact: most requests in flight at one instant
    stats: dict[str, Stats] = field(default_factory=dict)  # keys: METRIC_KEYS

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(values_s: list[float], percentiles: list[float]) -> Stats:
    v = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    return Stats(float(np.mean(v)), float(np.median(v)), float(np.std(v)),
                 tuple((float(p), float(np.percentile(v, p))) for p in percentiles))


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"bad --goodput item {spec!r}: use ttft:MS, tpot:MS or e2el:MS")
        if float(value) < 0:
            raise ValueError(f"--goodput {name} must be >= 0 ms")
        slos[name] = float(value)
    return slos


def _peaks(outputs: list[RequestOutput]) -> tuple[float, int]:
    ok = [o for o in outputs if o.success]
    if not ok:
        return 0.0, 0
    t0 = min(o.start_time for o in ok)
    num_buckets = int(np.ceil(max(o.start_time + o.latency for o in ok) - t0)) + 1
    tokens = np.zeros(num_buckets)
    active = np.zeros(num_buckets)
    for o in ok:
        t = o.start_time + o.ttft
        times = [t]
        for gap in o.itl:
            t += gap
            times.append(t)
        for tt in times:
            b = int(tt - t0)
            if 0 <= b < num_buckets:
                tokens[b] += 1
        for s in range(int(o.start_time - t0), int(o.start_time + o.latency - t0) + 1):
            active[s] += 1
    return float(tokens.max()), int(active.max())


def _max_inflight(outputs: list[RequestOutput]) -> int:
    # (time, +1 start / -1 end); an end sorts before a start at the same instant
    events = sorted([(o.start_time, 1) for o in outputs if o.success]
                    + [(o.start_time + o.latency, -1) for o in outputs if o.success])
    peak = cur = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def calculate_metrics(
    outputs: list[RequestOutput], duration: float, percentiles: list[float],
    slos_ms: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    ttfts, tpots, all_tpots, itls, e2els, out_lens = [], [], [], [], [], []
    total_input = 0
    for o in outputs:
        if not o.success:
            out_lens.append(0)
            continue
        out_lens.append(o.output_tokens)
        total_input += o.prompt_len
        tpot = 0.0
        if o.output_tokens > 1:
            tpot = (o.latency - o.ttft) / (o.output_tokens - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += o.itl
        ttfts.append(o.ttft)
        e2els.append(o.latency)
    completed = len(ttfts)
    goodput = None
    if slos_ms:
        columns = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        names = [k for k in ("ttft", "tpot", "e2el") if k in slos_ms]
        good = sum(all(slos_ms[k] / 1000.0 >= v for k, v in zip(names, row))
                   for row in zip(*(columns[k] for k in names)))
        goodput = good / duration
    peak_tok, peak_conc = _peaks(outputs)
    total_output = sum(out_lens)
    stats = {"ttft": _stats(ttfts, percentiles), "tpot": _stats(tpots, percentiles),
             "itl": _stats(itls, percentiles), "e2el": _stats(e2els, percentiles)}
    return BenchmarkMetrics(
        completed=completed, failed=len(outputs) - completed, total_input=total_input,
        total_output=total_output, duration=duration, request_throughput=completed / duration,
        request_goodput=goodput, output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        max_output_tokens_per_s=peak_tok, max_concurrent_requests=peak_conc,
        max_inflight_requests=_max_inflight(outputs), stats=stats)
