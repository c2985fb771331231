"""Time a whole prompt's prefill on one GPU at a real config with dummy weights (developer tool).

For each prompt length and chunk size: the prompt is prefilled in chunks of `chunk` tokens (as the
prefill worker's --chunked_prefill_size cuts it), timed end to end with CUDA events (median of
--reps). For glm4_moe_lite both MLA forms run: "absorbed" (attention in the 576-dim latent space) and
"expanded" (K/V decompressed per chunk, shared/model/layers/mla.py), so the table shows what the
expanded form buys. The ceiling is a bf16 matmul measured in the same run: `util` = the prompt's
model FLOPs (2 x active parameters per token + causal attention as the model defines it, i.e. the
expanded form's FLOPs) / time / that peak.
    python -m bench.prefill_step --preset glm-4.7-flash --tokens 1024,4096,16384 \
        --configs absorbed:512,absorbed:8192,expanded:8192
With --prompts P, each row prefills P prompts of `tokens` each, as many whole prompts per forward as fit
in `chunk` tokens (how the prefill worker batches a load test's short prompts); --quantization fp8 runs
the FP8 weights the fleet benchmarks use; --profile prints torch.profiler's top kernels of one such row.
    python -m bench.prefill_step --tokens 512 --prompts 64 --configs expanded:8192 --quantization fp8 --profile
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import glmserve.shared.model.layers.mla as mla
from glmserve.shared.config.presets import write_preset
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from bench.profile_step import experts_touched_by, timed, touched_summary

PAGE = 16


def matmul_peak() -> float:
    """bf16 TFLOP/s of an 8192^3 torch.mm."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / timed(lambda: a @ b, 10) / 1e12


def active_params(runner: ModelRunner) -> float:
    """Parameters one token multiplies: non-expert weights (less the embedding) + its top-k routed experts'
    + a fused shared expert's (the stacked experts' slots past E)."""
    cfg = runner.config
    dense = experts = 0.0
    for name, p in runner.model.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".experts." in name:  # [S, ...]: E routed slots, then the shared one when fused
            slots = p.shape[0]
            experts += p.numel() / slots * (cfg.num_experts_per_tok + slots - cfg.n_routed_experts)
        else:
            dense += p.numel()
    return dense + experts


def attention_flops(runner: ModelRunner, n: int) -> float:
    """Causal attention FLOPs of an n-token prompt (QK^T and PV, half the square)."""
    c = runner.config
    if c.model_type == "glm4_moe_lite":
        dk, dv = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    else:
        dk = dv = c.head_dim
    return 2 * c.num_hidden_layers * c.num_attention_heads * (dk + dv) * n * n / 2


def prefill(runner: ModelRunner, kv: PagedKVCache, ids: list[int], chunk: int, prompts: int = 1) -> None:
    """One prompt in chunks of `chunk` tokens or, with prompts > 1, that many copies of it (distinct pages),
    whole prompts batched into forwards of at most `chunk` tokens."""
    per_prompt = -(-len(ids) // PAGE)
    if prompts == 1:
        pages = list(range(1, per_prompt + 1))
        for start in range(0, len(ids), chunk):
            part = ids[start: start + chunk]
            batch = ForwardBatch.build(ForwardMode.PREFILL, [(part, start, pages)], PAGE, device="cuda")
            runner.forward(batch, kv)
        return
    group = max(1, chunk // len(ids))
    for first in range(0, prompts, group):
        seqs = [(ids, 0, list(range(1 + i * per_prompt, 1 + (i + 1) * per_prompt)))
                for i in range(first, min(prompts, first + group))]
        runner.forward(ForwardBatch.build(ForwardMode.PREFILL, seqs, PAGE, device="cuda"), kv)


def print_kernels(run) -> None:
    """torch.profiler's top kernels by device time over one call of `run`."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    with prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="glm-4.7-flash")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--configs", default="absorbed:512,absorbed:8192,expanded:8192",
                   help="form:chunk pairs (form absorbed|expanded; ignored for GQA models)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=1, help="prompts of `tokens` each per row (batched per chunk)")
    p.add_argument("--quantization", default=None, choices=[None, "fp8"])
    p.add_argument("--profile", action="store_true", help="torch.profiler top kernels of the first row")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    tokens = [int(x) for x in a.tokens.split(",")]
    with tempfile.TemporaryDirectory() as d:
        runner = ModelRunner(write_preset(d, a.preset), device="cuda", dtype="bfloat16", load_format="dummy",
                             with_mtp=False, quantization=a.quantization)
    kv = PagedKVCache(runner.kv_layout(PAGE), a.prompts * (max(tokens) // PAGE + 1) + 2, device="cuda")
    peak, act = matmul_peak(), active_params(runner)
    configs = [(f, int(c)) for f, c in (x.split(":") for x in a.configs.split(","))]
    if runner.config.model_type != "glm4_moe_lite":
        configs = sorted({("-", c) for _, c in configs})
    rows = []
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s; active params {act / 1e9:.2f} B; weights {a.quantization or 'bf16'}; "
          f"{a.prompts} prompt(s) per row", flush=True)
    print(f"{'tokens':>7} {'chunk':>6} {'form':>9} {'experts/layer':>13} {'ms':>9} {'tok/s':>9} {'TFLOP/s':>8} "
          f"{'util':>5}")
    for n in tokens:
        ids = [(7 * i) % 150000 + 3 for i in range(n)]
        flops = (2 * act * n + attention_flops(runner, n)) * a.prompts
        for form, chunk in configs:
            mla.EXPAND_MIN_Q = 10 ** 9 if form == "absorbed" else 16
            run = lambda: prefill(runner, kv, ids, chunk, a.prompts)  # noqa: E731
            touched = touched_summary(experts_touched_by(runner, run))  # one untimed pass, counting experts
            s = timed(run, a.reps)
            if a.profile and not rows:
                print_kernels(run)
            row = dict(tokens=n, prompts=a.prompts, chunk=chunk, form=form, experts_touched=touched, ms=s * 1e3,
                       tok_s=n * a.prompts / s, tflops=flops / s / 1e12, util=flops / s / 1e12 / peak)
            rows.append(row)
            print(f"{n:7d} {chunk:6d} {form:>9} {touched:>13} {row['ms']:9.1f} {row['tok_s']:9.0f} "
                  f"{row['tflops']:8.1f} {row['util']:5.2f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": a.preset, "quantization": a.quantization or "bf16", "matmul_peak_tflops": peak,
                       "active_params": act, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
