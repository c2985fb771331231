"""Launch-config sweep of the two decode-step kernels furthest from the HBM roofline at batch 256
(bench/gpu_results/h200_run8_overlap/profile_fp8.txt): MLA decode (kernels/mla_decode.py) and the
block-scaled FP8 GEMM (kernels/fp8_gemm.py) on GLM-4.7-Flash's shapes, at decode batch sizes.

Every variant is checked against the current rule's output (relative Frobenius error) before it is
timed, as a CUDA graph of 16+ calls (GPU time, no launch cost); inputs rotate over enough copies that
nothing is served from L2 (> 200 MB per rotation), so each time is an HBM time. Fraction = bytes the kernel must read / time / the copy bandwidth measured
in the same run (GB/s read + written, as bench/profile_step.py's roofline).
    python -m bench.decode_sweep --out $OUT/decode_sweep.json [--only mla,gemm]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.profile_step import copy_bandwidth, timed
from glmserve.kernels.act_quant import quant_fp8_group
from glmserve.kernels.fp8_gemm import fp8_gemm
from glmserve.kernels.mla_decode import mla_decode

ROTATE_BYTES = 256 << 20
REPS = 16  # calls per timed graph
MLA_SHAPES = ((1, 640), (64, 640), (128, 640), (256, 640), (64, 4096), (1, 16384))
# (BLOCK_N, num_warps, num_stages, splits, prefetch page ids); None = the current rule; "rule+prefetch" =
# the current rule's configs with the page ids loaded a step ahead
MLA_VARIANTS = (None, "rule+prefetch", (32, 4, 3, 1, 0), (32, 4, 2, 1, 0), (32, 4, 2, 1, 1), (32, 4, 3, 1, 1),
                (32, 4, 3, 4, 0), (32, 4, 3, 4, 1), (64, 8, 2, 1, 1), (64, 8, 2, 2, 1), (32, 4, 3, 2, 1),
                (64, 4, 2, 1, 1))
# GLM-4.7-Flash's FP8 GEMMs per layer (N, K): fused q_a + kv_a, q_b, o_proj, shared expert gate_up and down
GEMM_SHAPES = ((1344, 2048), (5120, 768), (2048, 5120), (3072, 2048), (2048, 1536))
GEMM_MS = (1, 64, 256)
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, split_k); None = the current rule
GEMM_VARIANTS = (None, (16, 64, 128, 1, 4, 4, 1), (16, 32, 128, 1, 4, 4, 1), (32, 64, 128, 1, 4, 4, 1),
                 (64, 64, 128, 8, 4, 4, 1), (64, 128, 128, 8, 4, 4, 2), (64, 64, 128, 8, 4, 4, 2),
                 (64, 128, 128, 8, 4, 3, 4), (128, 64, 128, 8, 4, 4, 1), (32, 128, 128, 1, 4, 4, 1),
                 (64, 32, 128, 8, 4, 4, 1))


def graph_time(fn, copies: int) -> float:
    """Seconds per call of fn(i) (i cycling over the input copies), from one CUDA graph of REPS calls:
    the GPU time alone (timing eager calls one by one measures the host's launch cost instead)."""
    reps = max(REPS, copies)
    for i in range(copies):  # compile and warm up
        fn(i)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    return timed(graph.replay, 10) / reps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(1, nbytes)))


def sweep_mla(bw: float) -> list[dict]:
    rows = []
    for b, ctx in MLA_SHAPES:
        pages = ctx // 16 + 1
        nbytes = b * ctx * 576 * 2
        n = _copies(b * pages * 16 * 576 * 2)
        caches = [torch.randn(b * pages * 16, 1, 576, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, 20, 576, device="cuda", dtype=torch.bfloat16)
        ref = mla_decode(q, caches[0], table, lens, 16, 0.1, ctx, 512, prefetch=False)
        for v in MLA_VARIANTS:
            rule = v is None or isinstance(v, str)
            cfg = None if rule else v[:3] + (0,)
            splits = None if rule else v[3]
            prefetch = (v is not None) if rule else bool(v[4])
            name = ("rule" if v is None else v) if rule else "n%d w%d s%d split%d prefetch%d" % v
            try:
                err = _rel(mla_decode(q, caches[0], table, lens, 16, 0.1, ctx, 512, splits=splits, config=cfg,
                                      prefetch=prefetch), ref)
                t = graph_time(lambda i: mla_decode(q, caches[i], table, lens, 16, 0.1, ctx, 512,
                                                    splits=splits, config=cfg, prefetch=prefetch), n)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                rows.append(dict(kernel="mla", b=b, ctx=ctx, variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            rows.append(dict(kernel="mla", b=b, ctx=ctx, variant=name, us=t * 1e6, rel_err=err,
                             frac=nbytes / t / 1e9 / bw))
        del caches
        torch.cuda.empty_cache()
    return rows


def sweep_gemm(bw: float) -> list[dict]:
    rows = []
    for n_out, k in GEMM_SHAPES:
        n = _copies(n_out * k)
        ws = [torch.randn(n_out, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(n)]
        w_scale = torch.rand(-(-n_out // 128), -(-k // 128), device="cuda") + 0.5
        for m in GEMM_MS:
            aq, a_scale = quant_fp8_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), 128)
            nbytes = n_out * k + m * k + 2 * m * n_out
            ref = fp8_gemm(aq, a_scale, ws[0], w_scale, None, torch.bfloat16, block=128)
            for v in GEMM_VARIANTS:
                cfg, split = (None, None) if v is None else (v[:6], v[6])
                name = "rule" if v is None else "%dx%dx%d g%d w%d s%d splitk%d" % v
                try:
                    err = _rel(fp8_gemm(aq, a_scale, ws[0], w_scale, None, torch.bfloat16, block=128,
                                        split_k=split, config=cfg), ref)
                    t = graph_time(lambda i: fp8_gemm(aq, a_scale, ws[i], w_scale, None, torch.bfloat16,
                                                      block=128, split_k=split, config=cfg), n)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(kernel="gemm", m=m, n=n_out, k=k, variant=name,
                                     error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(kernel="gemm", m=m, n=n_out, k=k, variant=name, us=t * 1e6, rel_err=err,
                                 frac=nbytes / t / 1e9 / bw))
        del ws
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="mla,gemm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    if "mla" in a.only:
        rows += sweep_mla(bw)
    if "gemm" in a.only:
        rows += sweep_gemm(bw)
    print(f"copy GB/s {bw:.0f}")
    key = lambda r: (r["kernel"], r.get("b", r.get("m")), r.get("ctx", r.get("n")))  # noqa: E731
    for r in rows:
        shape = f"B {r['b']:3d} ctx {r['ctx']:5d}" if r["kernel"] == "mla" else f"M {r['m']:3d} N {r['n']:5d} K {r['k']:5d}"
        if "error" in r:
            print(f"{r['kernel']:4s} {shape}  {r['variant']:32s}  ERROR {r['error'][:80]}")
        else:
            print(f"{r['kernel']:4s} {shape}  {r['variant']:32s} {r['us']:8.1f} us  {r['frac']:.2f} of copy  "
                  f"err {r['rel_err']:.1e}")
    best: dict = {}
    for r in rows:
        if "error" not in r and r["rel_err"] < 2e-2 and (key(r) not in best or r["us"] < best[key(r)]["us"]):
            best[key(r)] = r
    print("best per shape:")
    for k_, r in best.items():
        print(f"  {k_}: {r['variant']} {r['us']:.1f} us ({r['frac']:.2f} of copy)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(copy_gbps=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
