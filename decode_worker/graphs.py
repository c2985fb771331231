"""CUDA-graph settings of a decode worker (leader, at start; followers capture from the leader's plan).

`--graph_max_batch_size N`: DECODE steps of at most N sequences are padded to a bucket (1, 2, 4, 8,
16, 32, ... N) and replayed from a graph captured at start (shared.runner.model_runner.DecodeGraphs);
larger batches, and batches with a sequence of --graph_max_seq_len tokens or more, run eagerly.
Default: --max_running (at most 512) on cuda, 0 (off) on cpu. On cpu a value > 0 runs the same padded batches eagerly (the
tests' emulation of the graph path). Buckets stop at --max_running (a step never holds more).
`--graph_max_seq_len L` (default 0 = --max_req_total_len when given, else the model's
max_position_embeddings, so every admitted request fits). A larger L costs only page-table columns
(B x L / page_size int32 copied per step) and, for GQA, more attention splits at small batch.
With --mtp_step K > 0 the worker runs VERIFY and DRAFT steps, never DECODE: the graphs are of VERIFY
steps with K + 1 tokens per sequence, of the first DRAFT pass padded to K + 1 rows per request
(decode_worker.mtp._first_pass) and of the chained DRAFT passes (1 row). A step where some request has
no page room for its drafts runs eagerly. K + 1 must fit in a page.
"""

from __future__ import annotations

import logging

from glmserve.shared.worker_common.plan import GraphSpec, StepPlan

log = logging.getLogger("glmserve.decode_worker")


def graph_spec(device: str, graph_max_batch_size: int | None, graph_max_seq_len: int, max_running: int,
               max_req_total_len: int, max_positions: int, mtp_step: int, page_size: int = 16) -> GraphSpec | None:
    """What to capture, or None. graph_max_batch_size None = the device's default: on cuda every batch
    the decode may run (--max_running, at most 512: a batch past the graphs runs eager, ~5x slower on
    H200 at 170 sequences), on cpu 0."""
    n = graph_max_batch_size if graph_max_batch_size is not None else (min(512, max_running) if device == "cuda" else 0)
    if n < 0 or graph_max_seq_len < 0:
        raise ValueError("--graph_max_batch_size and --graph_max_seq_len must be >= 0")
    if n == 0:
        return None
    if mtp_step + 1 > page_size:
        log.info("--mtp_step %d: %d verify tokens do not fit a page of %d; no graphs", mtp_step, mtp_step + 1, page_size)
        return None
    seq_len = graph_max_seq_len or max_req_total_len or max_positions
    return GraphSpec(max_batch_size=min(n, max_running), max_seq_len=min(seq_len, max_positions),
                     tokens_per_seq=mtp_step + 1)


def capture(engine, spec: GraphSpec | None) -> list[int]:
    """Every rank captures the same buckets (the plan reaches the followers first). Returns them."""
    if spec is None:
        return []
    engine.lead(StepPlan(mode="", graphs=spec))
    return next(iter(engine.runner.graph_sets.values())).sizes
