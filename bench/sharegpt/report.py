"""The summary table (vLLM `bench serve` layout) and the JSON result of one run (benchmark client)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from bench.sharegpt.client import RequestOutput
from bench.sharegpt.load import LoadShape
from bench.sharegpt.metrics import METRIC_KEYS, BenchmarkMetrics

HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


@dataclass(frozen=True)
class RunInfo:
    """What was run: goes into the table title and the JSON."""

    base_url: str
    endpoint: str
    model: str
    dataset: str  # "sharegpt" | "random" | "prefix"
    synthetic: bool
    workload: str
    shape: LoadShape
    num_prompts: int
    seed: int
    token_counter: str
    ignore_eos: bool


def _line(name: str, value, fmt: str = "") -> str:
    return ("{:<40} {:<10" + fmt + "}").format(name, value)


def format_table(m: BenchmarkMetrics, info: RunInfo, percentile_metrics: list[str], goodput: bool) -> str:
    title = " Serving Benchmark Result " + ("(synthetic ShareGPT) " if info.synthetic else "")
    rows = ["{s:{c}^{n}}".format(s=title, n=50, c="="),
            _line("Successful requests:", m.completed), _line("Failed requests:", m.failed)]
    if info.shape.max_concurrency is not None:
        rows.append(_line("Maximum request concurrency:", info.shape.max_concurrency))
    if not math.isinf(info.shape.request_rate):
        rows.append(_line("Request rate configured (RPS):", info.shape.request_rate, ".2f"))
    rows += [_line("Benchmark duration (s):", m.duration, ".2f"),
             _line("Total input tokens:", m.total_input), _line("Total generated tokens:", m.total_output),
             _line("Request throughput (req/s):", m.request_throughput, ".2f")]
    if goodput and m.request_goodput is not None:
        rows.append(_line("Request goodput (req/s):", m.request_goodput, ".2f"))
    rows += [_line("Output token throughput (tok/s):", m.output_throughput, ".2f"),
             _line("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f"),
             _line("Peak concurrent requests:", m.max_concurrent_requests, ".2f"),
             _line("Peak in-flight requests:", m.max_inflight_requests),
             _line("Total Token throughput (tok/s):", m.total_token_throughput, ".2f")]
    for key in [k for k in METRIC_KEYS if k in percentile_metrics]:
        short, header = HEADERS[key]
        st = m.stats[key]
        rows += ["{s:{c}^{n}}".format(s=header, n=50, c="-"),
                 _line(f"Mean {short} (ms):", st.mean, ".2f"), _line(f"Median {short} (ms):", st.median, ".2f")]
        for p, v in st.percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            rows.append(_line(f"P{word} {short} (ms):", v, ".2f"))
    rows.append("=" * 50)
    return "\n".join(rows)


def _flat_stats(m: BenchmarkMetrics) -> dict:
    flat = {}
    for key, st in m.stats.items():
        flat[f"mean_{key}_ms"], flat[f"median_{key}_ms"], flat[f"std_{key}_ms"] = st.mean, st.median, st.std
        for p, v in st.percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            flat[f"p{word}_{key}_ms"] = v
    return flat


def result_json(info: RunInfo, m: BenchmarkMetrics, outputs: list[RequestOutput], server: dict | None) -> dict:
    """vLLM's result fields plus ours (dataset, synthetic, workload, server_metrics)."""
    rate = info.shape.request_rate
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if "chat" in info.endpoint else "openai" if "/v1/" in info.endpoint else "lightllm",
        "base_url": info.base_url, "endpoint": info.endpoint, "model_id": info.model,
        "dataset": info.dataset, "synthetic": info.synthetic,
        "dataset_note": "synthetic ShareGPT-shaped set (bench/README.md)" if info.synthetic else "",
        "workload": info.workload, "num_prompts": info.num_prompts, "seed": info.seed,
        "request_rate": "inf" if math.isinf(rate) else rate, "burstiness": info.shape.burstiness,
        "max_concurrency": info.shape.max_concurrency, "ignore_eos": info.ignore_eos,
        "token_counter": info.token_counter,
        "duration": m.duration, "completed": m.completed, "failed": m.failed,
        "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput, "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s, "max_concurrent_requests": m.max_concurrent_requests,
        "max_inflight_requests": m.max_inflight_requests,
        **_flat_stats(m),
        "input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_tokens for o in outputs],
        "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
        "e2els": [o.latency for o in outputs], "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs],
        "server_metrics": server or {},
    }
