"""Prometheus metrics of the router process (one registry per app, so tests can build several).

Runs in the router process. Request counts by endpoint and status; TTFT, inter-token latency
and end-to-end latency histograms (seconds, measured from request arrival at the router);
in-flight requests (HTTP) and runs (per choice, dispatched); queue depth; worker readiness; the
process's CPU seconds and memory (prometheus-client's process collector).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total: the load test's CPU use per process
        self.requests = Counter("router_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("router_time_to_first_token_seconds", "arrival -> first token",
                              buckets=_LAT_BUCKETS, registry=r)
        self.itl = Histogram("router_inter_token_latency_seconds", "gap between token events",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("router_e2e_request_latency_seconds", "arrival -> last token",
                             buckets=_LAT_BUCKETS, registry=r)
        self.inflight = Gauge("router_inflight_requests", "HTTP generation requests in progress", registry=r)
        self.inflight_runs = Gauge("router_inflight_runs", "dispatched runs (one per choice)", registry=r)
        self.queue_depth = Gauge("router_queue_depth", "runs waiting for a decode to admit them (queued or reserving)", registry=r)
        self.worker_ready = Gauge("router_worker_ready", "1 while the worker is ready", ["worker", "role"],
                                  registry=r)
        self.prompt_tokens = Counter("router_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.output_tokens = Counter("router_generation_tokens", "generated tokens", registry=r)
        self.aborts = Counter("router_aborts", "runs aborted by the router", ["reason"], registry=r)
        self.reruns = Counter("router_reruns", "runs re-run from scratch before their first token", ["reason"],
                              registry=r)
        self.reserve_timeouts = Counter("router_reserve_timeouts", "decode reservations not answered in time "
                                        "(the run goes back to the queue)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
