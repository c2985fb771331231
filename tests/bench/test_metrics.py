"""vLLM `bench serve` metric arithmetic against values computed by hand on recorded timings."""

import pytest

from bench.sharegpt.client import RequestOutput
from bench.sharegpt.metrics import calculate_metrics, parse_goodput


def _recorded() -> list[RequestOutput]:
    return [
        RequestOutput(True, start_time=0.0, ttft=0.1, itl=[0.05, 0.05, 0.1], latency=0.3, output_tokens=4, prompt_len=10),
        RequestOutput(True, start_time=0.5, ttft=0.2, itl=[0.25], latency=0.45, output_tokens=2, prompt_len=20),
        RequestOutput(True, start_time=1.2, ttft=0.4, itl=[], latency=0.4, output_tokens=1, prompt_len=5),
        RequestOutput(False, start_time=1.3, prompt_len=7, error="HTTP 500"),
    ]


def test_counts_and_throughputs():
    m = calculate_metrics(_recorded(), duration=2.0, percentiles=[90, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input == 35  # the failed request's prompt is not counted
    assert m.total_output == 7
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(21.0)
    assert m.request_goodput is None


def test_latency_stats_ms():
    m = calculate_metrics(_recorded(), duration=2.0, percentiles=[90, 99])
    ttft, tpot, itl, e2el = (m.stats[k] for k in ("ttft", "tpot", "itl", "e2el"))
    assert ttft.mean == pytest.approx(700 / 3)
    assert ttft.median == pytest.approx(200)
    assert ttft.std == pytest.approx(124.7219, rel=1e-5)
    assert dict(ttft.percentiles) == pytest.approx({90.0: 360.0, 99.0: 396.0})
    # TPOT = (e2e - ttft) / (out - 1); the 1-token request is left out
    assert tpot.mean == pytest.approx((200 / 3 + 250) / 2)
    assert tpot.median == pytest.approx((200 / 3 + 250) / 2)
    assert itl.mean == pytest.approx(112.5)  # pooled gaps 50, 50, 100, 250
    assert itl.median == pytest.approx(75.0)
    assert e2el.mean == pytest.approx(1150 / 3)
    assert e2el.median == pytest.approx(400.0)


def test_goodput():
    m = calculate_metrics(_recorded(), 2.0, [99], parse_goodput(["ttft:250", "tpot:100"]))
    assert m.request_goodput == pytest.approx(0.5)  # only the first request meets both
    m = calculate_metrics(_recorded(), 2.0, [99], parse_goodput(["e2el:420"]))
    assert m.request_goodput == pytest.approx(1.0)  # 300 ms and 400 ms meet it, 450 ms does not
    # a 1-token request has TPOT 0 for goodput: it passes any tpot SLO
    m = calculate_metrics(_recorded(), 2.0, [99], parse_goodput(["tpot:1"]))
    assert m.request_goodput == pytest.approx(0.5)


def test_peak_tokens_and_concurrency():
    m = calculate_metrics(_recorded(), 2.0, [99])
    # tokens at 0.1 0.15 0.2 0.3 | 0.7 0.95 -> second 0 holds 6; 1.6 -> second 1
    assert m.max_output_tokens_per_s == 6.0
    assert m.max_concurrent_requests == 2
    assert m.max_inflight_requests == 1  # A ends at 0.3, B runs 0.5-0.95, C 1.2-1.6: never overlap


def test_all_failed_gives_zeros():
    m = calculate_metrics([RequestOutput(False, prompt_len=3)], 1.0, [99])
    assert (m.completed, m.total_output, m.max_concurrent_requests) == (0, 0, 0)
    assert m.stats["ttft"].mean == 0.0


@pytest.mark.parametrize("bad", ["ttft", "speed:3", "ttft:-1"])
def test_bad_goodput_spec(bad):
    with pytest.raises(ValueError):
        parse_goodput([bad])
