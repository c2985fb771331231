"""Launch-config sweep of the two decode-step kernels furthest from the HBM roofline at batch 256
(bench/gpu_results/h200_run8_overlap/profile_fp8.txt): MLA decode (kernels/mla_decode.py) and the
block-scaled FP8 GEMM (kernels/fp8_gemm.py) on GLM-4.7-Flash's shapes, at decode batch sizes.

Every variant is checked against the current rule's output (relative Frobenius error) before it is
timed, as a CUDA graph of 16+ calls (GPU time, no launch cost); inputs rotate over enough copies that
nothing is served from L2 (> 200 MB per rotation), so each time is an HBM time. Fraction = bytes the kernel must read / time / the copy bandwidth measured
in the same run (GB/s read + written, as bench/profile_step.py's roofline).
    python -m bench.decode_sweep --out $OUT/decode_sweep.json [--only mla,gemm,moe,dense]
The fused MoE's two grouped GEMMs (kernels/fused_moe.py, 55 % of the FP8 step at B 256 on an H100, run 16)
are swept the same way ("moe").
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.profile_step import copy_bandwidth, timed
from glmserve.kernels import fused_moe
from glmserve.kernels.act_quant import quant_fp8_group, quant_fp8_per_token
from glmserve.kernels.moe_align import moe_align
from glmserve.kernels.fp8_gemm import fp8_gemm
from glmserve.kernels import mla_decode as mla_decode_mod
from glmserve.kernels.mla_decode import mla_decode

ROTATE_BYTES = 256 << 20
REPS = 16  # calls per timed graph
MLA_SHAPES = ((1, 640), (64, 640), (128, 640), (256, 640), (64, 4096), (1, 16384))
# (BLOCK_N, num_warps, num_stages, splits, prefetch page ids); splits 0 = the rule's splits for the batch; None =
# the current rule. Earlier sweeps (n32/n64 with and without prefetch, H200 run 13; n16, a lazy rescale, head
# groups, H100 runs 18 / 19) led to the rule.
MLA_VARIANTS = (None, (32, 4, 3, 0, 1), (16, 4, 3, 0, 1))
# The Hopper warpgroup-MMA kernel (kernels/mla_decode_wg.py): (num_warps, stages, splits); splits 0 = its rule's
# (mla_decode.wg_splits). The "rule" row is the default path: the wg kernel where WG_CONFIGS enables it.
MLA_WG_VARIANTS = ((4, 2, 0), (8, 2, 0), (4, 2, 1), (4, 2, 2), (4, 2, 4))
# GLM-4.7-Flash's FP8 GEMMs per layer (N, K): fused q_a + kv_a, q_b, o_proj, shared expert gate_up and down
GEMM_SHAPES = ((1344, 2048), (5120, 768), (2048, 5120), (3072, 2048), (2048, 1536))
GEMM_MS = (1, 64, 256)
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, split_k); None = the current rule
GEMM_VARIANTS = (None, (16, 64, 128, 1, 4, 4, 1), (16, 32, 128, 1, 4, 4, 1), (32, 64, 128, 1, 4, 4, 1),
                 (64, 64, 128, 8, 4, 4, 1), (64, 128, 128, 8, 4, 4, 2), (64, 64, 128, 8, 4, 4, 2),
                 (64, 128, 128, 8, 4, 3, 4), (128, 64, 128, 8, 4, 4, 1), (32, 128, 128, 1, 4, 4, 1),
                 (64, 32, 128, 8, 4, 4, 1), (64, 64, 128, 8, 4, 4, 4), (64, 32, 128, 8, 4, 4, 2),
                 (128, 64, 128, 8, 8, 3, 2), (64, 64, 128, 8, 4, 3, 2))


# GLM-4.7-Flash's fused MoE: 64 routed experts + the shared one stacked last, top-4 (+ the shared slot), H 2048, I 1536
MOE_E, MOE_K, MOE_H, MOE_I = 65, 4, 2048, 1536
MOE_BATCHES = (1, 64, 256)
# (BLOCK_M (0 = the rule's), BLOCK_N, BLOCK_K, warps, stages), BLOCK_N as given; None = the rule (BLOCK_N narrowed)
MOE_VARIANTS = (None, (0, 32, 128, 4, 4), (0, 64, 128, 4, 4), (0, 128, 128, 4, 4), (0, 32, 256, 4, 3),
                (0, 64, 256, 4, 3), (0, 128, 256, 4, 3), (0, 64, 128, 4, 6), (0, 128, 128, 8, 4), (0, 128, 256, 8, 3),
                (0, 256, 128, 8, 3), (0, 32, 128, 2, 5), (16, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4))


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
    rows = Rows()
    for b, ctx in MLA_SHAPES:
        pages = ctx // 16 + 1
        nbytes = b * ctx * 576 * 2
        n = _copies(b * pages * 16 * 576 * 2)
        caches = [torch.randn(b * pages * 16, 1, 576, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, 20, 576, device="cuda", dtype=torch.bfloat16)
        ref = mla_decode(q, caches[0], table, lens, 16, 0.1, ctx, 512, config=(16, 4, 3, 4), prefetch=False)
        wg_ok = torch.cuda.get_device_capability()[0] == 9
        for v in MLA_VARIANTS + ((("triton rule",),) + MLA_WG_VARIANTS if wg_ok else ()):
            kw, wg_rules = {}, dict(mla_decode_mod.WG_CONFIGS)
            if v == ("triton rule",):  # the Triton kernel's own rule (WG_CONFIGS off)
                mla_decode_mod.WG_CONFIGS.clear()
                name = "triton rule"
            elif v is not None and len(v) == 3:  # warpgroup-MMA kernel
                kw = dict(wg=v[:2], splits=v[2] or None)
                name = "wg w%d s%d split%d" % v
            elif v is not None:
                # a given config with splits 0 keeps the rule's split count (config[3] = 4 = CONFIGS' fixed)
                kw = dict(config=v[:3] + (0 if v[3] else 4,), splits=v[3] or None, prefetch=bool(v[4]))
                name = "n%d w%d s%d split%d prefetch%d" % v
            else:
                name = "rule"
            try:
                err = _rel(mla_decode(q, caches[0], table, lens, 16, 0.1, ctx, 512, **kw), ref)
                t = graph_time(lambda i: mla_decode(q, caches[i], table, lens, 16, 0.1, ctx, 512, **kw), n)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                rows.append(dict(kernel="mla", b=b, ctx=ctx, variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            finally:
                mla_decode_mod.WG_CONFIGS.update(wg_rules)
            rows.append(dict(kernel="mla", b=b, ctx=ctx, variant=name, us=t * 1e6, rel_err=err,
                             frac=nbytes / t / 1e9 / bw))
        del caches
        torch.cuda.empty_cache()
    return rows


def sweep_gemm(bw: float, ms: tuple[int, ...] = GEMM_MS, shapes: int = len(GEMM_SHAPES)) -> list[dict]:
    rows = Rows()
    for n_out, k in GEMM_SHAPES[:shapes]:
        n = _copies(n_out * k)
        ws = [torch.randn(n_out, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(n)]
        w_scale = torch.rand(-(-n_out // 128), -(-k // 128), device="cuda") + 0.5
        for m in ms:
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


DENSE_MS = (1, 64, 128, 256)
# TMA kernel tiles for mid M beside its table's (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
DENSE_TMA_EXTRA = ((64, 128, 256, 8, 4, 3), (128, 64, 256, 8, 4, 3), (64, 64, 256, 8, 4, 4), (128, 128, 128, 8, 8, 4))
# Pointer-kernel configs for M <= 16 (batch 1 runs these GEMMs at ~0.33 of HBM, H100 run 32): N block, K block and
# split-K, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, split_k)
DENSE_SMALL_VARIANTS = tuple((16, bn, bk, 1, 4, 4, split) for bn in (32, 64) for bk in (128, 256)
                             for split in (1, 2, 4, 8))
# The GEMV kernel (kernels/fp8_gemv.py) for M <= 4: its rule, then (BLOCK_N, BLOCK_K, warps)
DENSE_GEMV_VARIANTS = (None, (1, 2048, 4), (2, 2048, 4), (4, 2048, 4), (8, 2048, 4), (2, 1024, 4), (4, 1024, 4),
                       (8, 512, 4), (4, 2048, 8))


def sweep_dense(bw: float, ms: tuple[int, ...] = DENSE_MS) -> list[dict]:
    """The per-channel W8A8 GEMMs the FP8 decode step runs (GEMM_SHAPES' three attention GEMMs: the shared
    expert is fused into the MoE): the Triton rule against torch._scaled_mm (fp8_gemm.SCALED_MM_M); for M <= 4 the
    GEMV kernel at DENSE_GEMV_VARIANTS' configs; for M <= 16 the pointer kernel at DENSE_SMALL_VARIANTS' configs;
    for M > 64 the pointer kernel at GEMM_VARIANTS' configs and the TMA kernel (kernels/fp8_gemm_tma.py, which the
    rule takes only above M 512) at its table's configs."""
    from glmserve.kernels import fp8_gemm as fp8_gemm_mod
    from glmserve.kernels.fp8_gemm_tma import fp8_gemm_tma
    from glmserve.kernels.fp8_gemv import fp8_gemv

    rows = Rows()
    for n_out, k in GEMM_SHAPES[:3]:
        n = _copies(n_out * k)
        ws = [torch.randn(n_out, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(n)]
        w_scale = torch.rand(n_out, 1, device="cuda") + 0.5
        for m in ms:
            aq, a_scale = quant_fp8_per_token(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            nbytes = n_out * k + m * k + 2 * m * n_out
            ref = fp8_gemm(aq, a_scale, ws[0], w_scale, None, torch.bfloat16)
            variants = [("rule", None, None), ("scaled_mm", None, None)]
            if m <= 4:
                variants += [("gemv " + ("rule" if v is None else "%dx%d w%d" % v), v, "gemv")
                             for v in DENSE_GEMV_VARIANTS]
            if m <= 16:
                variants += [("%dx%dx%d g%d w%d s%d splitk%d" % v, v[:6], v[6]) for v in DENSE_SMALL_VARIANTS]
            if m > 64:
                variants += [("%dx%dx%d g%d w%d s%d splitk%d" % v, v[:6], v[6]) for v in GEMM_VARIANTS if v]
                tma = [c for name, c in fp8_gemm_mod.TMA_CONFIGS.items() if name != "fast"] + list(DENSE_TMA_EXTRA)
                variants += [("tma %dx%dx%d g%d w%d s%d" % cfg, cfg, "tma") for cfg in tma]

            def call(i, cfg, split):
                if split == "gemv":
                    out = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
                    return fp8_gemv(aq, a_scale, ws[i], w_scale, None, out, cfg)
                if split == "tma":
                    out = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
                    return fp8_gemm_tma(aq, a_scale, ws[i], w_scale, None, out, cfg, fp8_gemm_mod.PRECISE_ACC)
                return fp8_gemm(aq, a_scale, ws[i], w_scale, None, torch.bfloat16, split_k=split, config=cfg)

            for name, cfg, split in variants:
                window = (1, 1 << 30) if name == "scaled_mm" else None
                saved, fp8_gemm_mod.SCALED_MM_M = fp8_gemm_mod.SCALED_MM_M, window
                try:
                    err = _rel(call(0, cfg, split), ref)
                    t = graph_time(lambda i, cfg=cfg, split=split: call(i, cfg, split), n)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(kernel="gemm", m=m, n=n_out, k=k, variant=name,
                                     error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                finally:
                    fp8_gemm_mod.SCALED_MM_M = saved
                rows.append(dict(kernel="gemm", m=m, n=n_out, k=k, variant=name, us=t * 1e6, rel_err=err,
                                 frac=nbytes / t / 1e9 / bw))
        del ws
        torch.cuda.empty_cache()
    return rows


# GLM-4.7-Flash's absorbed MLA up-projections (kernels/mla_absorb.py): 20 heads, nope 192, v 256, L 512
ABSORB_T = (1, 64, 256)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); None = the rule; "bmm" = torch.bmm on a dequantized bf16 copy
# Wide N blocks read each activation tile fewer times (B 256 W_UV at BLOCK_N 32: 8 reads of a 5 MB input, L2-bound)
ABSORB_VARIANTS = (None, "bmm", (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3),
                   (128, 128, 64, 8, 3), (256, 64, 64, 8, 3), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3),
                   (128, 256, 64, 8, 3), (64, 128, 128, 8, 3))


def sweep_absorb(bw: float) -> list[dict]:
    """Both absorbed MLA GEMMs (W_UK: K nope = kv_b rows; W_UV: K L = kv_b columns) on FP8 kv_b_proj views, per
    launch config and against torch.bmm on a bf16 copy dequantized once (the path before the kernel).
    Bytes = the FP8 weights + scales + activations in and out (bmm reads its bf16 copy: twice the weight bytes)."""
    from glmserve.kernels.mla_absorb import mla_absorb

    rows = Rows()
    h, nope, v, lora = 20, 192, 256, 512
    n = _copies(h * (nope + v) * lora)
    ws = [torch.randn(h * (nope + v), lora, device="cuda").to(torch.float8_e4m3fn) for _ in range(n)]
    scale = torch.rand(h, nope + v, device="cuda") * 1e-2
    deq = [(w.view(h, nope + v, lora).float() * scale[..., None]).to(torch.bfloat16) for w in ws]
    for t in ABSORB_T:
        for k_rows, name_w in ((True, "W_UK"), (False, "W_UV")):
            rows_ = slice(0, nope) if k_rows else slice(nope, nope + v)
            k_dim, n_dim = (nope, lora) if k_rows else (lora, v)
            a = torch.randn(t, h, k_dim, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(t, h, n_dim, device="cuda", dtype=torch.bfloat16)
            nbytes = h * (rows_.stop - rows_.start) * (lora + 4) + 2 * t * h * (k_dim + n_dim)
            s = scale[:, rows_]
            ref = mla_absorb(a, ws[0].view(h, nope + v, lora)[:, rows_], s, k_rows, torch.empty_like(out)).clone()
            bmm_w = [(wd[:, rows_] if k_rows else wd[:, rows_].transpose(1, 2)).contiguous() for wd in deq]

            for var in ABSORB_VARIANTS:
                if var == "bmm":
                    def call(i, out=out):
                        return torch.bmm(a.transpose(0, 1), bmm_w[i], out=out.transpose(0, 1))
                    label = "bmm (bf16 copy)"
                else:
                    def call(i, var=var, out=out):
                        return mla_absorb(a, ws[i].view(h, nope + v, lora)[:, rows_], s, k_rows, out, config=var)
                    label = "rule" if var is None else "%dx%dx%d w%d s%d" % var
                try:
                    call(0)
                    err = _rel(out, ref)
                    t_s = graph_time(call, n)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(kernel="absorb", b=t, gemm=name_w, variant=label,
                                     error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(kernel="absorb", b=t, gemm=name_w, variant=label, us=t_s * 1e6, rel_err=err,
                                 frac=nbytes / t_s / 1e9 / bw))
    del ws
    torch.cuda.empty_cache()
    return rows


def _moe_inputs(b: int, gen: torch.Generator):
    """Batch b of GLM-4.7-Flash's MoE: top-4 of 64 routed experts + the fused shared expert (id 64, last)."""
    routed = torch.stack([torch.randperm(MOE_E - 1, generator=gen)[:MOE_K] for _ in range(b)])
    ids = torch.cat([routed, torch.full((b, 1), MOE_E - 1)], 1).to("cuda")
    weights = torch.rand(b, MOE_K + 1, generator=gen).to("cuda")
    x = torch.randn(b, MOE_H, generator=gen).to("cuda", torch.bfloat16)
    return ids, weights, x


def sweep_moe(bw: float, batches: tuple[int, ...] = MOE_BATCHES) -> list[dict]:
    """The two grouped FP8 GEMMs of the fused MoE (kernels/fused_moe.py) at decode batches, per launch
    config, and for B <= 4 the GEMV (kernels/fp8_gemv.moe_gemv) at DENSE_GEMV_VARIANTS' configs. Bytes = the
    touched experts' weights (+ scales); the rule's BLOCK_M unless a variant sets it."""
    from glmserve.kernels.fp8_gemv import moe_gemv

    rows, gen = Rows(), torch.Generator().manual_seed(0)
    shapes = {"w13": (2 * MOE_I, MOE_H), "w2": (MOE_H, MOE_I)}
    weights_fp8 = {}
    for name, (n_out, k) in shapes.items():
        copies = _copies(MOE_E * n_out * k)
        weights_fp8[name] = [torch.randn(MOE_E, n_out, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
    scales = {name: torch.rand(MOE_E, n_out, device="cuda") + 0.5 for name, (n_out, _) in shapes.items()}
    for b in batches:
        ids, weights, x = _moe_inputs(b, gen)
        flat_ids = ids.reshape(-1).contiguous()
        num_pairs, touched = ids.numel(), ids.unique().numel()
        flat_w = weights.reshape(-1).float().contiguous()
        rule = fused_moe._config(x.device, num_pairs, MOE_E, True)
        inputs = {"w13": quant_fp8_per_token(x), "w2": quant_fp8_per_token(torch.randn(num_pairs, MOE_I, device="cuda",
                                                                                      dtype=torch.bfloat16))}
        for name, (n_out, k) in shapes.items():
            a, a_s = inputs[name]
            a_div, mul = (MOE_K + 1, False) if name == "w13" else (1, True)
            out = torch.empty(num_pairs, n_out, device="cuda", dtype=torch.bfloat16)
            ws = weights_fp8[name]
            nbytes = touched * n_out * (k + 4)
            ref = None
            gemv = [("gemv", v) for v in DENSE_GEMV_VARIANTS] if b <= 4 else []
            for kind, v in [("mma", v) for v in MOE_VARIANTS] + gemv:
                if kind == "gemv":
                    cfg, pairs, block_expert = None, None, None
                    label = "gemv " + ("rule" if v is None else "%dx%d w%d" % v)
                else:
                    cfg = rule if v is None else ((v[0] or rule[0]),) + v[1:]
                    label = "rule %dx%dx%d w%d s%d" % rule if v is None else "bm%d %dx%d w%d s%d" % v
                    pairs, block_expert = moe_align(ids, MOE_E, cfg[0], dense_last=True)

                def call(i, cfg=cfg, pairs=pairs, block_expert=block_expert, narrow=v is None, kind=kind, v=v):
                    if kind == "gemv":
                        return moe_gemv(a, a_s, ws[i], scales[name], out, flat_w, flat_ids, a_div, mul, v)
                    fused_moe._gemm(a, a_s, ws[i], scales[name], out, flat_w, pairs, block_expert, num_pairs, a_div,
                                    cfg, mul, narrow=narrow)
                    return out
                try:
                    got = call(0).clone()
                    ref = got if ref is None else ref
                    err = _rel(got, ref)
                    t = graph_time(call, len(ws))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                    rows.append(dict(kernel="moe", b=b, gemm=name, variant=label, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(kernel="moe", b=b, gemm=name, variant=label, us=t * 1e6, rel_err=err,
                                 frac=nbytes / t / 1e9 / bw, experts_touched=touched))
    del weights_fp8
    torch.cuda.empty_cache()
    return rows


def row_line(r: dict) -> str:
    shape = (f"B {r['b']:3d} ctx {r['ctx']:5d}" if r["kernel"] == "mla" else
             f"B {r['b']:3d} {r['gemm']:9s}" if r["kernel"] in ("moe", "absorb") else
             f"M {r['m']:3d} N {r['n']:5d} K {r['k']:5d}")
    if "error" in r:
        return f"{r['kernel']:4s} {shape}  {r['variant']:32s}  ERROR {r['error'][:80]}"
    return (f"{r['kernel']:4s} {shape}  {r['variant']:32s} {r['us']:8.1f} us  {r['frac']:.2f} of copy  "
            f"err {r['rel_err']:.1e}")


class Rows(list):
    """A sweep's result rows, each printed as it comes (a sweep cut off by its time limit keeps what it measured)."""

    def append(self, r: dict) -> None:
        super().append(r)
        print(row_line(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="mla,gemm")
    ap.add_argument("--gemm_ms", default=",".join(map(str, GEMM_MS)), help="GEMM M values (comma list)")
    ap.add_argument("--dense_ms", default=",".join(map(str, DENSE_MS)), help="dense sweep M values (comma list)")
    ap.add_argument("--gemm_shapes", type=int, default=len(GEMM_SHAPES),
                    help="the first N of GEMM_SHAPES (3: the attention GEMMs, shared experts fused into the MoE)")
    ap.add_argument("--moe_batches", default=",".join(map(str, MOE_BATCHES)), help="MoE sweep batches (comma list)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy GB/s {bw:.0f}", flush=True)
    rows = []
    if "mla" in a.only:
        rows += sweep_mla(bw)
    if "gemm" in a.only:
        rows += sweep_gemm(bw, tuple(int(m) for m in a.gemm_ms.split(",")), a.gemm_shapes)
    if "moe" in a.only:
        rows += sweep_moe(bw, tuple(int(b) for b in a.moe_batches.split(",")))
    if "absorb" in a.only:
        rows += sweep_absorb(bw)
    if "dense" in a.only:
        rows += sweep_dense(bw, tuple(int(m) for m in a.dense_ms.split(",")))
    key = lambda r: (r["kernel"], r.get("b", r.get("m")), r.get("ctx", r.get("n", r.get("gemm"))))  # noqa: E731
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
