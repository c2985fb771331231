"""Command-line flags of bench/run_sharegpt.py (names as in `vllm bench serve`; dashes or underscores)."""

from __future__ import annotations

import argparse

from bench.sharegpt.client import ENDPOINTS
from bench.sharegpt.load import WORKLOADS


def _add(p: argparse.ArgumentParser, name: str, **kw) -> None:
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    p.add_argument(*names, **kw)


def _dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", "--dataset-name", "--dataset_name", dest="dataset",
                   choices=("sharegpt", "random", "prefix"), default="sharegpt")
    _add(p, "--dataset-path", default=None, help="ShareGPT JSON; without it a synthetic ShareGPT-shaped set")
    _add(p, "--num-prompts", type=int, default=200)
    _add(p, "--seed", type=int, default=0)
    _add(p, "--tokenizer", default=None, help="model dir or tokenizer path used to count tokens")
    _add(p, "--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT")
    _add(p, "--sharegpt-min-len", type=int, default=4)
    _add(p, "--sharegpt-max-prompt-len", type=int, default=1024)
    _add(p, "--sharegpt-max-total-len", type=int, default=2048)
    _add(p, "--random-input-len", type=int, default=1024)
    _add(p, "--random-output-len", type=int, default=128)
    _add(p, "--random-range-ratio", type=float, default=0.0)
    _add(p, "--prefix-len", type=int, default=256, help="shared prefix length (prefix dataset)")
    _add(p, "--num-prefixes", type=int, default=4)


def _load_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--workload", choices=(*WORKLOADS, "custom", "all"), default="custom",
         help="burst | high-conc | moderate | steady | all four | custom (--request-rate/--max-concurrency)")
    _add(p, "--request-rate", type=float, default=float("inf"))
    _add(p, "--burstiness", type=float, default=1.0)
    _add(p, "--max-concurrency", type=int, default=None)
    p.add_argument("--sweep", choices=("rate", "concurrency"), default=None)
    _add(p, "--sweep-values", default=None, help="comma list; default 1,2,4,8,16,32,inf or 1,2,4,...,256")
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs in ms: ttft:MS tpot:MS e2el:MS")
    _add(p, "--percentile-metrics", default="ttft,tpot,itl,e2el")
    _add(p, "--metric-percentiles", default="90,99")


def _server_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=ENDPOINTS, default=None, help="default /v1/completions (or by --backend)")
    p.add_argument("--model", default=None, help="model name; default: the first of GET /v1/models")
    _add(p, "--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    _add(p, "--prompt-as-text", action="store_true", help="never send token-id prompts")
    _add(p, "--metrics-url", action="append", default=None,
         help="Prometheus /metrics to scrape before/after (repeatable); default BASE_URL/metrics")
    _add(p, "--no-server-metrics", action="store_true")
    _add(p, "--metrics-settle-s", type=float, default=1.0,
         help="wait before the after-run scrape (the fleet's workers refresh /metrics every 0.5 s)")
    _add(p, "--request-timeout", type=float, default=6 * 3600.0)
    _add(p, "--no-warmup", action="store_true")


def _vllm_compat_flags(p: argparse.ArgumentParser) -> None:
    """Flags `vllm bench serve` users type; resolved into the ones above by `resolve`."""
    p.add_argument("--host", default=None, help="with --port: base URL http://HOST:PORT")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--backend", choices=("openai", "openai-chat", "vllm", "lightllm"), default=None,
                   help="picks the endpoint when --endpoint is not given")
    _add(p, "--save-result", action="store_true", help="accepted; results are always saved")


BACKEND_ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions",
                     "openai-chat": "/v1/chat/completions", "lightllm": "/generate_stream"}


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.host or args.port:
        args.base_url = f"http://{args.host or '127.0.0.1'}:{args.port or 8000}"
    if args.endpoint is None:
        args.endpoint = BACKEND_ENDPOINTS.get(args.backend or "openai")
    return args


def _output_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--result-dir", default="out/bench")
    _add(p, "--result-filename", default=None)
    _add(p, "--no-plots", action="store_true")
    _add(p, "--disable-tqdm", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run_sharegpt.py", description=__doc__)
    for add in (_dataset_flags, _load_flags, _server_flags, _vllm_compat_flags, _output_flags):
        add(p)
    return p
