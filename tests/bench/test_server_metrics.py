"""Server-side figures from two Prometheus scrapes, in the fleet's metric names (glm_worker_*)."""

import pytest

from bench.sharegpt.server_metrics import parse, summarize


def _scrape(nbytes_p, nbytes_d, secs_p, used_d, drafted=None, accepted=None) -> str:
    lines = [
        "# TYPE glm_worker_kv_transfer_bytes counter",
        f'glm_worker_kv_transfer_bytes_total{{worker="p0",role="prefill"}} {nbytes_p}',
        f'glm_worker_kv_transfer_bytes_total{{worker="d0",role="decode"}} {nbytes_d}',
        "# TYPE glm_worker_kv_transfer_seconds counter",
        f'glm_worker_kv_transfer_seconds_total{{worker="p0",role="prefill"}} {secs_p}',
        "# TYPE glm_worker_kv_pages_used gauge",
        f'glm_worker_kv_pages_used{{worker="p0",role="prefill"}} 2',
        f'glm_worker_kv_pages_used{{worker="d0",role="decode"}} {used_d}',
        "# TYPE glm_worker_kv_pages_free gauge",
        f'glm_worker_kv_pages_free{{worker="p0",role="prefill"}} 98',
        f'glm_worker_kv_pages_free{{worker="d0",role="decode"}} {100 - used_d}',
        "# TYPE glm_worker_queue_depth gauge",
        'glm_worker_queue_depth{worker="p0",role="prefill"} 4',
    ]
    if drafted is not None:
        lines += ["# TYPE glm_worker_mtp_draft_tokens counter", f"glm_worker_mtp_draft_tokens_total {drafted}",
                  "# TYPE glm_worker_mtp_accepted_tokens counter", f"glm_worker_mtp_accepted_tokens_total {accepted}"]
    return "\n".join(lines) + "\n"


def test_kv_gbps_counts_the_sender_once():
    before = parse(_scrape(1e9, 1e9, 1.0, 0))
    after = parse(_scrape(4e9, 4e9, 2.5, 30))
    s = summarize(before, after, duration=10.0)
    assert s["kv_transfer_gb"] == pytest.approx(3.0)  # prefill side only, not both sides
    assert s["kv_transfer_gb_per_s_while_sending"] == pytest.approx(2.0)
    assert s["kv_transfer_gb_per_s_over_run"] == pytest.approx(0.3)
    assert s["kv_pages_used"] == 32 and s["kv_pages_total"] == 200
    assert s["kv_pages_used_by_role"] == {"prefill": 2.0, "decode": 30.0}
    assert s["queue_depths"] == {"glm_worker_queue_depth": 4.0}
    assert "mtp_acceptance_rate" not in s


def test_mtp_acceptance_and_absent_metrics():
    s = summarize(parse(_scrape(0, 0, 0, 0, 100, 60)), parse(_scrape(0, 0, 0, 0, 300, 210)), 1.0)
    assert s["mtp_acceptance_rate"] == pytest.approx(0.75)
    assert summarize({}, {}, 1.0) == {"counter_deltas": {}}


def test_peak_sampler_keeps_gauge_maxima(timed_server):
    import time

    from bench.sharegpt.server_metrics import PeakSampler

    with PeakSampler([timed_server + "/metrics"], period_s=0.05) as sampler:
        time.sleep(0.4)
    assert sampler.peaks["glm_kv_pages_used"] == 12 and sampler.peaks["glm_prefill_queue_tokens"] == 3
    assert not any("_total" in k for k in sampler.peaks)
    s = summarize({}, {}, 1.0, sampler.peaks)
    assert s["kv_pages_used_peak"] == 12 and s["queue_depths_peak"] == {"glm_prefill_queue_tokens": 3.0}


def test_expert_coverage_is_reported_per_layer():
    text = ("# TYPE glm_worker_moe_distinct_experts gauge\n"
            'glm_worker_moe_distinct_experts{layer="1",worker="p0"} 5\n'
            'glm_worker_moe_distinct_experts{layer="2",worker="p0"} 64\n')
    s = summarize({}, parse(text), 1.0)
    assert s["moe_experts"] == {"glm_worker_moe_distinct_experts{layer=1,worker=p0}": 5.0,
                                "glm_worker_moe_distinct_experts{layer=2,worker=p0}": 64.0}


def test_cpu_seconds_are_kept_per_process():
    """Each scraped URL's process CPU time becomes its own figure (summing routers and workers would
    hide a saturated single-threaded router); the fleet's registries export it over real HTTP."""
    import time

    from prometheus_client import start_http_server

    from bench.sharegpt import server_metrics
    from glmserve.router.metrics import RouterMetrics
    from glmserve.shared.worker_common.metrics import WorkerMetrics
    from glmserve.shared.ports import free_port

    urls, servers = [], []
    for m in (RouterMetrics(), WorkerMetrics("d0", "decode")):
        port = free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=m.registry)[0])
        urls.append(f"http://127.0.0.1:{port}/metrics")
    try:
        before, errs = server_metrics.scrape(urls)
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # burn CPU in this (the served) process
            sum(range(1000))
        burned = time.process_time() - t0
        after, errs2 = server_metrics.scrape(urls)
    finally:
        for srv in servers:
            srv.shutdown()
    assert not errs and not errs2
    s = summarize(before, after, duration=2.0)
    assert set(s["process_cpu"]) == set(urls)
    for cpu in s["process_cpu"].values():  # each URL's own delta, not the sum over both
        assert burned - 0.05 <= cpu["cpu_s"] <= burned + 0.3
        assert cpu["cores_busy"] == pytest.approx(cpu["cpu_s"] / 2.0)
