"""Main of bench/run_sharegpt.py: build the dataset, run workloads or sweeps, print, save JSON and PNGs.

Runs in the benchmark client process. Each run: warm-up request, /metrics scrape, the load,
/metrics scrape, metrics, the vLLM-layout table, `<result-dir>/<name>.json` and `<name>.png`.
A sweep adds `<name>_sweep.json` and `<name>_sweep.png`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from dataclasses import replace

import httpx

from bench.sharegpt import plots, server_metrics
from bench.sharegpt.client import RequestConfig
from bench.sharegpt.datasets import LengthFilter, SampleRequest, load_sharegpt, synthetic_sharegpt
from bench.sharegpt.flags import build_parser, resolve
from bench.sharegpt.load import WORKLOADS, LoadShape, run_load, warmup
from bench.sharegpt.metrics import calculate_metrics, parse_goodput
from bench.sharegpt.report import RunInfo, format_table, result_json
from bench.sharegpt.synthetic_sets import RandomSpec, prefix_requests, random_requests
from bench.sharegpt.text import TokenCounter, load_counter

DEFAULT_RATES = "1,2,4,8,16,32,inf"
DEFAULT_CONCURRENCIES = "1,2,4,8,16,32,64,128,256"


def build_requests(args, counter: TokenCounter) -> tuple[list[SampleRequest], bool]:
    """(requests, synthetic?) for the chosen dataset."""
    n, seed = args.num_prompts, args.seed
    if args.dataset == "sharegpt":
        flt = LengthFilter(args.sharegpt_min_len, args.sharegpt_max_prompt_len, args.sharegpt_max_total_len)
        if args.dataset_path:
            return load_sharegpt(args.dataset_path, n, counter, seed, flt, args.sharegpt_output_len), False
        return synthetic_sharegpt(n, counter, seed, flt, args.sharegpt_output_len), True
    spec = RandomSpec(args.random_input_len, args.random_output_len, args.random_range_ratio,
                      args.prefix_len, args.num_prefixes)
    make = random_requests if args.dataset == "random" else prefix_requests
    return make(n, spec, counter, seed), False


def _model_name(base_url: str) -> str:
    try:
        data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10).json()
        return data["data"][0]["id"]
    except Exception:  # noqa: BLE001 - servers without /v1/models take any name
        return "default"


def shapes(args) -> list[tuple[str, LoadShape]]:
    """(workload name, shape) of every run this invocation makes."""
    base = LoadShape(args.request_rate, args.max_concurrency, args.burstiness)
    if args.sweep:
        default = DEFAULT_RATES if args.sweep == "rate" else DEFAULT_CONCURRENCIES
        values = [v.strip() for v in (args.sweep_values or default).split(",")]
        if args.sweep == "rate":
            return [(f"rate-{v}", replace(base, request_rate=float(v))) for v in values]
        return [(f"conc-{v}", replace(base, request_rate=math.inf, max_concurrency=int(v))) for v in values]
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    out = []
    for name in names:
        shape = base if name == "custom" else WORKLOADS[name]
        if name == "high-conc" and args.max_concurrency:
            shape = replace(shape, max_concurrency=args.max_concurrency)
        out.append((name, shape))
    return out


def run_one(args, cfg: RequestConfig, requests, counter, info: RunInfo, stem: str) -> dict:
    urls = [] if args.no_server_metrics else (args.metrics_url or [args.base_url.rstrip("/") + "/metrics"])
    before, errs = server_metrics.scrape(urls)
    with server_metrics.PeakSampler([] if errs else urls) as sampler:
        run = run_load(cfg, requests, info.shape, counter, args.seed, not args.disable_tqdm, args.request_timeout)
        if urls:
            time.sleep(args.metrics_settle_s)  # let counters of the run's last requests land
    after, errs2 = server_metrics.scrape(urls)
    sampler.add(after)
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    m = calculate_metrics(run.outputs, run.duration, percentiles, slos)
    server = server_metrics.summarize(before, after, run.duration, sampler.peaks) if urls and not (errs or errs2) else {}
    print(format_table(m, info, args.percentile_metrics.split(","), bool(slos)))
    _print_server(server, errs + errs2, m.total_output)
    result = result_json(info, m, run.outputs, server)
    path = os.path.join(args.result_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plots:
        plots.plot_latency_cdfs(result, os.path.join(args.result_dir, stem + ".png"))
    print(f"result: {path}" + ("" if args.no_plots else f" (+ {stem}.png)"))
    return result


def _print_server(server: dict, errors: list[str], output_tokens: int) -> None:
    for err in errors:
        print(f"server /metrics not read: {err}")
    for key in ("kv_transfer_gb", "kv_transfer_gb_per_s_while_sending", "kv_transfer_gb_per_s_over_run",
                "kv_pages_used_peak", "kv_pages_total", "mtp_acceptance_rate"):
        if key in server:
            print("{:<40} {:<10.4g}".format(key + ":", server[key]))
    for line in server_metrics.expert_lines(server.get("moe_experts") or {}):
        print(line)
    for url, cpu in (server.get("process_cpu") or {}).items():
        per_tok = 1e6 * cpu["cpu_s"] / output_tokens if output_tokens else float("nan")
        print(f"cpu {url}: {cpu['cpu_s']:.2f} s, {cpu['cores_busy']:.2f} cores busy, {per_tok:.0f} us per output token")
    for name, depth in (server.get("queue_depths_peak") or {}).items():
        print("{:<40} {:<10.0f}".format("peak " + name + ":", depth))
    for name, n in sorted((server.get("counter_deltas") or {}).items()):  # work redone or dropped in the run
        if n and name.startswith(("router_reruns_total", "router_reserve_timeouts_total", "router_aborts_total",
                                  "glm_worker_aborts_total")):
            print("{:<40} {:<10.0f}".format(name + ":", n))


def main(argv: list[str] | None = None) -> list[dict]:
    args = resolve(build_parser().parse_args(argv))
    os.makedirs(args.result_dir, exist_ok=True)
    counter = load_counter(args.tokenizer)
    requests, synthetic = build_requests(args, counter)
    if not requests:
        sys.exit("no request passed the dataset filters")
    model = args.model or _model_name(args.base_url)
    cfg = RequestConfig(args.base_url, args.endpoint, model, args.ignore_eos, args.temperature,
                        send_ids=not args.prompt_as_text)
    if synthetic:
        print("dataset: SYNTHETIC ShareGPT-shaped set (no --dataset-path); see bench/README.md")
    if not args.no_warmup:
        w = asyncio.run(warmup(cfg, requests[0], counter, args.request_timeout))
        if not w.success:
            sys.exit(f"warm-up request failed: {w.error}")
    stem0 = args.result_filename or f"{args.dataset}{'-synthetic' if synthetic else ''}"
    results = []
    for name, shape in shapes(args):
        info = RunInfo(args.base_url, args.endpoint, model, args.dataset, synthetic, name, shape,
                       len(requests), args.seed, counter.name, args.ignore_eos)
        results.append(run_one(args, cfg, requests, counter, info, f"{stem0}-{name}"))
    if args.sweep:
        key = "request_rate" if args.sweep == "rate" else "max_concurrency"
        with open(os.path.join(args.result_dir, f"{stem0}_sweep.json"), "w") as f:
            json.dump([{k: v for k, v in r.items() if not isinstance(v, list)} for r in results], f, indent=1)
        if not args.no_plots:
            plots.plot_sweep(results, os.path.join(args.result_dir, f"{stem0}_sweep.png"), key)
    return results
