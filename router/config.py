"""CLI parsing and the frozen config of the router process.

Runs in the router process only. Flags keep the names users know from the seeds
(`--model_dir`, `--max_req_total_len`, `--tool_call_parser`, `--reasoning_parser`); every
flag is accepted with dashes and with underscores. Workers are given as `id=tcp://host:port`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: str | None = None
    tokenizer: str | None = None
    served_model_name: str = "glm"
    events_addr: str = "tcp://127.0.0.1:5600"
    prefill: dict[str, str] = field(default_factory=dict)  # worker id -> control addr
    decode: dict[str, str] = field(default_factory=dict)
    tool_call_parser: str | None = None  # "glm45" | "glm47"
    reasoning_parser: str | None = None  # "glm45"
    max_req_total_len: int = 4096  # prompt + max_tokens (default: the model's max_position_embeddings)
    model_vocab_size: int | None = None  # from config.json; token ids are checked against it
    max_new_tokens_default: int = 16  # completions/generate default; chat defaults to the rest
    max_queue: int = 256  # requests waiting for a decode reservation; beyond -> 429
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_top_logprobs: int = 20
    request_timeout_s: float = 600.0
    reserve_timeout_s: float = 5.0  # a Reserve unanswered this long is re-tried elsewhere
    heartbeat_timeout_s: float = 3.0  # a worker silent this long is unready
    max_retries: int = 2  # re-runs of a request that produced no token yet
    # a run queued this long without a decode accepting it fails (503). Under a sustained load past the
    # decode's capacity a request waits its turn (the queue is bounded by max_queue), so this is long.
    queue_timeout_s: float = 600.0
    body_timeout_s: float = 30.0  # a request body not fully received this long after its headers: 408
    log_level: str = "info"


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """Add `--a_b` and `--a-b` as one option."""
    under, dash = "--" + name, "--" + name.replace("_", "-")
    p.add_argument(*([under] if under == dash else [under, dash]), dest=name, **kw)


def parse_workers(items: list[str] | None) -> dict[str, str]:
    """["p0=tcp://127.0.0.1:5601", ...] -> {"p0": "tcp://127.0.0.1:5601"}."""
    out: dict[str, str] = {}
    for item in items or []:
        wid, sep, addr = item.partition("=")
        if not sep or not wid or not addr.startswith("tcp://"):
            raise ValueError(f"bad worker {item!r}; expected id=tcp://host:port")
        if wid in out:
            raise ValueError(f"worker id {wid!r} given twice")
        out[wid] = addr
    return out


def build_parser() -> argparse.ArgumentParser:
    d = RouterConfig()
    p = argparse.ArgumentParser(prog="python -m glmserve.router", description="OpenAI-compatible router")
    _flag(p, "host", default=d.host)
    _flag(p, "port", type=int, default=d.port)
    _flag(p, "model_dir", default=None)
    _flag(p, "tokenizer", default=None)
    _flag(p, "served_model_name", default=None)
    _flag(p, "events_addr", default=d.events_addr)
    _flag(p, "prefill", action="append", default=[], help="id=tcp://host:port (repeat)")
    _flag(p, "decode", action="append", default=[], help="id=tcp://host:port (repeat)")
    _flag(p, "tool_call_parser", default=None, help="glm45 | glm47 (aliases like glm-4.5, glm4_moe)")
    _flag(p, "reasoning_parser", default=None, help="glm45")
    _flag(p, "max_req_total_len", type=int, default=None)
    for name in ("max_queue", "max_body_bytes", "max_n", "max_retries"):
        _flag(p, name, type=int, default=getattr(d, name))
    for name in ("request_timeout_s", "reserve_timeout_s", "heartbeat_timeout_s", "queue_timeout_s",
                 "body_timeout_s"):
        _flag(p, name, type=float, default=getattr(d, name))
    _flag(p, "log_level", default=d.log_level)
    return p


def model_limits(model_dir: str | None) -> tuple[int | None, int | None]:
    """(max_position_embeddings, vocab_size) from the checkpoint's config.json, None when unknown."""
    path = os.path.join(model_dir, "config.json") if model_dir else None
    if path is None or not os.path.isfile(path):
        return None, None
    with open(path) as f:
        hf = json.load(f)
    return hf.get("max_position_embeddings"), hf.get("vocab_size")


def parse_config(argv: list[str] | None = None) -> RouterConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    max_pos, vocab = model_limits(args.model_dir)
    from glmserve.router.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS, normalize_parser_name

    try:
        tool_parser = normalize_parser_name(args.tool_call_parser, TOOL_CALL_PARSERS)
        reasoning_parser = normalize_parser_name(args.reasoning_parser, REASONING_PARSERS)
    except ValueError as e:
        parser.error(str(e))
    name = args.served_model_name or (args.model_dir.rstrip("/").split("/")[-1] if args.model_dir else "glm")
    return RouterConfig(
        host=args.host,
        port=args.port,
        model_dir=args.model_dir,
        tokenizer=args.tokenizer,
        served_model_name=name,
        events_addr=args.events_addr,
        prefill=parse_workers(args.prefill),
        decode=parse_workers(args.decode),
        tool_call_parser=tool_parser,
        reasoning_parser=reasoning_parser,
        # never beyond the model's positions (a worker would reject the request after dispatch)
        max_req_total_len=min(x for x in (args.max_req_total_len or max_pos or RouterConfig.max_req_total_len,
                                          max_pos) if x),
        model_vocab_size=vocab,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_retries=args.max_retries,
        request_timeout_s=args.request_timeout_s,
        reserve_timeout_s=args.reserve_timeout_s,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
        queue_timeout_s=args.queue_timeout_s,
        body_timeout_s=args.body_timeout_s,
        log_level=args.log_level,
    )
