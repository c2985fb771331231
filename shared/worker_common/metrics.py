"""Prometheus metrics of one worker leader (prefill or decode), in its own registry.

Names are prefixed `glm_worker_` and labelled by worker id and role so a scrape of several
workers merges cleanly. tokens/s and GB/s come from the counters (rate()) and are also kept
as gauges of the last window for humans reading /metrics by eye.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total of the leader process
        lab = dict(labelnames=("worker", "role"), registry=self.registry)
        self._ids = (worker_id, role)
        g = lambda n, d: Gauge(f"glm_worker_{n}", d, **lab).labels(*self._ids)  # noqa: E731
        c = lambda n, d: Counter(f"glm_worker_{n}", d, **lab).labels(*self._ids)  # noqa: E731
        self.ready = g("ready", "1 when /readyz is 200")
        self.queue_depth = g("queue_depth", "requests waiting (prefill: queued prompts; decode: awaiting KV)")
        self.queued_tokens = g("queued_tokens", "prompt tokens not yet prefilled")
        self.running = g("running_requests", "requests in the running batch")
        self.pages_used = g("kv_pages_used", "KV pages in use")
        self.pages_free = g("kv_pages_free", "KV pages free")
        self.tokens = c("tokens", "tokens processed (prefill: prompt tokens; decode: generated)")
        self.tokens_per_s = g("tokens_per_second", "tokens/s over the last window")
        self.kv_bytes = c("kv_transfer_bytes", "KV bytes moved over the KV link")
        self.kv_seconds = c("kv_transfer_seconds", "seconds KV transfers were in flight")
        self.kv_gbps = g("kv_transfer_gbps", "KV GB/s per transfer over the last heartbeat window")
        self.aborts = c("aborts", "requests aborted")
        self.page_leaks = c("page_leaks", "pages found in use while idle (a bug)")
        self.requests = c("requests_finished", "requests this worker finished its part of")
        self.mtp_drafts = c("mtp_draft_tokens", "MTP draft tokens verified")
        self.mtp_accepted = c("mtp_accepted_tokens", "MTP draft tokens accepted")
        self.graph_steps = c("decode_graph_steps", "DECODE/VERIFY steps run from a graph bucket (cpu: padded eager)")
        self.overlap_steps = c("decode_overlap_steps", "DECODE steps launched before the previous one was read back")
        self.overlap_dropped = c("decode_overlap_dropped_rows",
                                 "rows computed for requests that had ended the step before (the overlap loop's cost)")
        self._graph_seen = 0
        self.step_time = Histogram(
            "glm_worker_step_seconds", "one scheduler step (forward + sample)", **lab,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        ).labels(*self._ids)
        self._failures = Counter(
            "glm_worker_handoff_failures", "KV handoff failures", labelnames=("worker", "role", "reason"),
            registry=self.registry,
        )
        exp = dict(labelnames=("worker", "role", "layer"), registry=self.registry)
        self._experts_touched = Gauge("glm_worker_moe_experts_touched",
                                      "experts with >= 1 routed token in the last heartbeat window, per MoE layer", **exp)
        self._expert_max_share = Gauge("glm_worker_moe_expert_max_share",
                                       "the busiest expert's share of the layer's routed tokens, last window", **exp)
        self._win_start = time.monotonic()
        self._win_tokens = 0
        self._kv_seen = (0, 0.0)

    def handoff_failure(self, reason: str) -> None:
        self._failures.labels(*self._ids, reason).inc()

    def add_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        self._win_tokens += n
        now = time.monotonic()
        if now - self._win_start >= 1.0:
            self.tokens_per_s.set(self._win_tokens / (now - self._win_start))
            self._win_start, self._win_tokens = now, 0

    def kv_totals(self, total_bytes: int, total_seconds: float) -> None:
        """Feed the link totals (monotonic): counters grow by the difference since the last call."""
        b0, s0 = self._kv_seen
        if total_bytes > b0:
            self.kv_transfer(total_bytes - b0, max(total_seconds - s0, 0.0))
        self._kv_seen = (total_bytes, total_seconds)

    def graph_steps_total(self, total: int) -> None:
        """Feed the runner's graph step count (monotonic): the counter grows by the difference."""
        if total > self._graph_seen:
            self.graph_steps.inc(total - self._graph_seen)
        self._graph_seen = total

    def kv_transfer(self, num_bytes: int, seconds: float) -> None:
        self.kv_bytes.inc(num_bytes)
        self.kv_seconds.inc(seconds)
        if seconds > 0:
            self.kv_gbps.set(num_bytes / seconds / 1e9)

    def experts(self, layers) -> None:
        """Per-layer expert figures of one window (expert_stats.LayerWindow list)."""
        for w in layers:
            self._experts_touched.labels(*self._ids, str(w.layer)).set(w.touched)
            self._expert_max_share.labels(*self._ids, str(w.layer)).set(w.max_share)

    def pages(self, used: int, free: int) -> None:
        self.pages_used.set(used)
        self.pages_free.set(free)

    def render(self) -> bytes:
        return generate_latest(self.registry)
