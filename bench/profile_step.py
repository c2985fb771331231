"""Profile one DECODE step of a real-shape model with dummy weights (GPU; developer tool).

Prints the eager step time, the CUDA-graph replay time of the same step (the difference is launch and
host overhead), the HBM roofline of the step (bytes of the active weights + KV read / copy bandwidth
measured in the same run) and torch.profiler's top ops by CUDA and by CPU time.
    python -m bench.profile_step --preset glm-4.7-flash --batch 16 --ctx 512 --out step.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from shared.config.presets import write_preset
from shared.kvcache.cache import PagedKVCache
from shared.runner.batch import ForwardBatch, ForwardMode
from shared.runner.model_runner import ModelRunner

PAGE = 16


def timed(fn, iters: int) -> float:
    """Median seconds of fn over iters runs, with CUDA events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB buffer."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / timed(lambda: y.copy_(x), 10) / 1e9


def active_weight_bytes(runner: ModelRunner, batch: int) -> float:
    """Weights a decode step must read: everything but the routed experts, plus the share of experts the
    batch can touch (at most batch * top_k of E per MoE layer; the embedding table read is ignored)."""
    cfg = runner.config
    total = expert = 0
    for name, p in runner.model.named_parameters():
        n = p.numel() * p.element_size()
        total += n
        expert += n if ".experts." in name else 0
    embed = cfg.vocab_size * cfg.hidden_size * 2  # only B rows of it are read
    used = min(1.0, batch * cfg.num_experts_per_tok / cfg.n_routed_experts)
    return total - embed - expert + expert * used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="glm-4.7-flash")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    d = tempfile.mkdtemp()
    runner = ModelRunner(write_preset(d, a.preset), device="cuda", dtype="bfloat16", load_format="dummy", with_mtp=False)
    per_seq = -(-(a.ctx + 1) // PAGE)
    kv = PagedKVCache(runner.kv_layout(PAGE), 1 + a.batch * per_seq, "cuda")
    seqs = [([7], a.ctx, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(a.batch)]
    dec = ForwardBatch.build(ForwardMode.DECODE, seqs, PAGE, device="cuda")
    eager = timed(lambda: runner.forward(dec, kv), 10)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    with prof:
        runner.forward(dec, kv)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18))
    t0 = time.perf_counter()
    runner.capture_decode_graphs(kv, max_batch_size=a.batch, max_seq_len=a.ctx + 16)
    capture_s = time.perf_counter() - t0
    graph = timed(lambda: runner.forward(dec, kv), 20)
    bw = copy_bandwidth()
    wbytes = active_weight_bytes(runner, a.batch)
    kv_bytes = kv.layout.page_bytes() / PAGE * a.ctx * a.batch
    floor = (wbytes + kv_bytes) / (bw * 1e9)
    res = dict(preset=a.preset, batch=a.batch, ctx=a.ctx, eager_ms=eager * 1e3, graph_ms=graph * 1e3,
               capture_s=capture_s, copy_gbps=bw, weight_bytes=wbytes, kv_bytes=kv_bytes, roofline_ms=floor * 1e3,
               graph_fraction_of_roofline=floor / graph, tok_s_graph=a.batch / graph)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
