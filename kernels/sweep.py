"""Variant sweep for the kernels below target (developer tool, run on the GPU; no worker imports it).

One call times and checks several launch configs of: the per-channel FP8 GEMM at M >= 2048 on GLM
shapes (pointer kernel vs TMA kernel, tiles, stages, precise vs fast accumulation) against
torch._scaled_mm (rowwise scales, with and without fast accumulation); MLA decode (B64, ctx 4096,
20 heads, 512 + 64) for the generic and the latent-once kernel; silu_and_mul_fp8 by num_warps.
Every variant's output is compared with a reference (relative Frobenius error) before it is timed.
    python -m glmserve.kernels.sweep --out $OUT/sweep.json [--only gemm,mla,silu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton

from glmserve.kernels import act_quant, fp8_gemm, fp8_gemm_tma, mla_decode, paged_attention

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
GEMM_SHAPES = ((12288, 4096), (4096, 12288), (21888, 4096), (1024, 4096), (5120, 768))
# (name, kernel, config (BM, BN, BK, GROUP_M, warps, stages), precise accumulation)
GEMM_VARIANTS = (
    ("ptr 128x128x128 w8 s4 precise", "ptr", (128, 128, 128, 8, 8, 4), True),
    ("tma 128x128x128 w8 s4 precise", "tma", (128, 128, 128, 8, 8, 4), True),
    ("tma 128x128x256 w8 s3 precise", "tma", (128, 128, 256, 8, 8, 3), True),
    ("tma 256x128x128 w8 s3 precise", "tma", (256, 128, 128, 8, 8, 3), True),
    ("tma 256x128x128 w8 s4 precise", "tma", (256, 128, 128, 8, 8, 4), True),
    ("tma 128x128x128 w4 s4 precise", "tma", (128, 128, 128, 8, 4, 4), True),
    ("tma 128x256x128 w8 s3 FAST", "tma", (128, 256, 128, 8, 8, 3), False),
    ("tma 256x128x128 w8 s3 FAST", "tma", (256, 128, 128, 8, 8, 3), False),
)
MLA_VARIANTS = (  # (name, use latent-once kernel, config (BLOCK_N, warps, stages, splits))
    ("generic 32x64 w8 s2", False, (32, 64, 8, 2)),
    ("latent n32 w4 s3 split4", True, (32, 4, 3, 4)),
    ("latent n32 w4 s2 split4", True, (32, 4, 2, 4)),
    ("latent n32 w4 s4 split4", True, (32, 4, 4, 4)),
    ("latent n32 w4 s3 split3", True, (32, 4, 3, 3)),
    ("latent n64 w8 s2 split2", True, (64, 8, 2, 2)),
)


def ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gemm_fn(kind, cfg, precise, a_q, a_s, w_q, w_s):
    m, n = a_q.shape[0], w_q.shape[0]
    out = torch.empty(m, n, device="cuda", dtype=BF16)
    if kind == "tma":
        return lambda: fp8_gemm_tma.fp8_gemm_tma(a_q, a_s, w_q, w_s, None, out, cfg, precise)
    fp8_gemm.CONFIGS[("default", "large")] = cfg
    fp8_gemm.CONFIGS[(fp8_gemm.gpu_name(a_q.device), "large")] = cfg
    fp8_gemm.PRECISE_ACC = precise
    return lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s)


def gemm(rows: list) -> None:
    fp8_gemm.TMA_LARGE = False  # "ptr" variants go through fp8_gemm with their config patched in
    for m in (2048, 4096):
        for n, k in GEMM_SHAPES:
            if m == 4096 and n in (1024, 5120):
                continue
            a_q, a_s = act_quant.quant_fp8_per_token(torch.randn(m, k, device="cuda", dtype=BF16))
            w = torch.randn(n, k, device="cuda")
            w_s = w.abs().amax(-1, keepdim=True) / 448.0
            w_q = (w / w_s).to(FP8)
            ref = (a_q.float() @ w_q.float().t()) * a_s * w_s.reshape(1, -1)
            flops = 2 * m * n * k
            sm = ms(lambda: torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16))
            smf = ms(lambda: torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16, use_fast_accum=True))
            err = rel(torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16), ref)
            shape = f"M{m} N{n} K{k}"
            rows.append(dict(sec="gemm", shape=shape, name="_scaled_mm", ms=sm, tflops=flops / sm / 1e9, err=err,
                             fast_ms=smf))
            for name, kind, cfg, precise in GEMM_VARIANTS:
                try:
                    fn = _gemm_fn(kind, cfg, precise, a_q, a_s, w_q, w_s)
                    e = rel(fn(), ref)
                    t = ms(fn)
                    rows.append(dict(sec="gemm", shape=shape, name=name, ms=t, tflops=flops / t / 1e9, err=e,
                                     ratio=sm / t, ratio_fast=smf / t))
                except Exception as ex:  # noqa: BLE001
                    rows.append(dict(sec="gemm", shape=shape, name=name, error=f"{type(ex).__name__}: {str(ex)[:200]}"))
                _print(rows[-1])
    fp8_gemm.TMA_LARGE, fp8_gemm.PRECISE_ACC = True, True


def mla(rows: list, hbm: float) -> None:
    from bench.kernels import REAL, _batch

    b, ctx = 64, 4096
    batch, slots = _batch(REAL, b, ctx, 1)
    lat = torch.randn(slots, 1, 576, device="cuda", dtype=BF16)
    q = torch.randn(b, 20, 576, device="cuda", dtype=BF16)
    ref = paged_attention.paged_attention_ref(q, lat, lat[..., :512], batch, 16, 0.0625)
    nbytes = slots * 576 * 2
    seq_lens = batch.seq_lens.to(torch.int32)
    for name, latent, cfg in MLA_VARIANTS:
        try:
            if latent:
                fn = lambda: mla_decode.mla_decode(q, lat, batch.page_table, seq_lens, 16, 0.0625, ctx, 512,  # noqa: E731
                                                   config=cfg)
            else:
                paged_attention.MLA_DECODE_KERNEL = False
                paged_attention.CONFIGS[("default", "mla", "decode")] = cfg
                fn = lambda: paged_attention.paged_attention(q, lat, lat[..., :512], batch, 16, 0.0625)  # noqa: E731
            e = rel(fn(), ref)
            t = ms(fn)
            rows.append(dict(sec="mla", shape=f"B{b} ctx{ctx}", name=name, ms=t, gbs=nbytes / t / 1e6,
                             frac=nbytes / t / 1e6 / hbm, err=e))
        except Exception as ex:  # noqa: BLE001
            rows.append(dict(sec="mla", name=name, error=f"{type(ex).__name__}: {str(ex)[:200]}"))
        paged_attention.MLA_DECODE_KERNEL = True
        _print(rows[-1])


def silu(rows: list, hbm: float) -> None:
    t, i = 16384, 1408
    x = torch.randn(t, 2 * i, device="cuda", dtype=BF16)
    q_ref, s_ref = act_quant.silu_and_mul_fp8_ref(x)
    nbytes = t * 2 * i * 2 + t * i + 4 * t
    for warps in (4, 8, 16):
        act_quant.SILU_WARPS = warps
        q, s = act_quant.silu_and_mul_fp8(x)
        tm = ms(lambda: act_quant.silu_and_mul_fp8(x))
        rows.append(dict(sec="silu", name=f"single-pass w{warps}", ms=tm, gbs=nbytes / tm / 1e6,
                         frac=nbytes / tm / 1e6 / hbm, err=rel(q.float() * s, q_ref.float() * s_ref)))
        _print(rows[-1])
    act_quant.SILU_WARPS = 0


def _graph_ms(fn, reps: int = 20) -> float:
    """GPU time alone: `reps` calls captured in one CUDA graph, replay time / reps (no host launch cost)."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return ms(g.replay) / reps


def launch(rows: list) -> None:
    """Eager (do_bench, host launch included) vs graph-replayed time of fp8_gemm at the small bench shapes."""
    for m, n, k in ((64, 12288, 4096), (64, 1024, 4096), (64, 5120, 768), (2048, 1024, 4096), (2048, 5120, 768),
                    (4096, 1024, 4096)):
        a_q, a_s = act_quant.quant_fp8_per_token(torch.randn(m, k, device="cuda", dtype=BF16))
        w_q = torch.randn(n, k, device="cuda").to(FP8)
        w_s = torch.rand(n, 1, device="cuda") + 0.5
        for tma in (True, False):
            fp8_gemm.TMA_LARGE = tma
            fn = lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s)  # noqa: E731
            sm = lambda: torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16)  # noqa: E731
            rows.append(dict(sec="launch", shape=f"M{m} N{n} K{k}", tma=tma, eager_ms=ms(fn), graph_ms=_graph_ms(fn),
                             scaled_mm_eager=ms(sm), scaled_mm_graph=_graph_ms(sm)))
            _print(rows[-1])
    fp8_gemm.TMA_LARGE = True


def _print(r: dict) -> None:
    print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep.json")
    ap.add_argument("--only", default="silu,mla,gemm,launch")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = 1 << 28
    src, dst = torch.randn(n, device="cuda", dtype=BF16), torch.empty(n, device="cuda", dtype=BF16)
    hbm = 2 * n * 2 / ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    rows: list = [dict(sec="ceiling", hbm_GBps=hbm, device=torch.cuda.get_device_name(), triton=triton.__version__)]
    _print(rows[0])
    t0 = time.time()
    for sec in args.only.split(","):
        try:
            {"silu": lambda: silu(rows, hbm), "mla": lambda: mla(rows, hbm), "gemm": lambda: gemm(rows),
             "launch": lambda: launch(rows)}[sec]()
        except Exception as ex:  # noqa: BLE001
            print(f"section {sec} failed: {type(ex).__name__}: {ex}", file=sys.stderr)
        print(f"-- {sec} done at {time.time() - t0:.0f}s", flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
