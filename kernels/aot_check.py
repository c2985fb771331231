"""Compile every kernel for Hopper (sm_90) on a machine without a GPU and report registers, spills and
shared memory (developer tool and a CI test; no worker imports it).

Triton compiles to PTX and ptxas (bundled with the triton wheel) assembles the cubin offline, so
compile errors that the interpreter cannot see (unsupported constructs, shared-memory overflow at real
tile sizes) show up here. Shapes are the GLM-4.5-Air / GLM-4.7-Flash launch configs.
    python -m glmserve.kernels.aot_check              # every case
    python -m glmserve.kernels.aot_check --shard 0/2  # cases 0, 2, 4, ... (run shards side by side: one a core)
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from glmserve.kernels import (act_quant, fp8_gemm, fp8_gemv, fused_moe, gqa_kv_write, kv_pages, mla_absorb, mla_decode,
                              mla_kv_write, moe_align, moe_route, moe_route_align, paged_attention, rmsnorm, rope)

P = {"bf16": "*bf16", "f8": "*fp8e4nv", "f32": "*fp32", "i32": "*i32", "i64": "*i64"}


def _attn(v_from_k: bool, splits: int, block_m: int, block_n: int, warps: int, stages: int, dims,
          g_kv: tuple[int, int] | None = None):
    da, db, dv = dims
    g, num_kv = g_kv or ((12, 8) if not v_from_k else (20, 1))
    sig = {n: P["bf16"] for n in ("q_ptr", "k_ptr", "v_ptr")}
    sig.update(out_ptr=P["bf16"] if splits == 1 else P["f32"], lse_ptr=P["f32"], page_table_ptr=P["i32"],
               seq_lens_ptr=P["i32"], qsl_ptr=P["i32"])
    sig.update({n: "i32" for n in ("q_st", "q_sh", "k_ss", "k_sh", "v_ss", "v_sh", "o_st", "o_sh", "o_ss",
                                   "pt_stride")})
    sig.update(scale_log2="fp32", page_size="i32", DA="i32", DB="i32", DV="i32")
    const = dict(G=g, NUM_KV=num_kv, NUM_SPLITS=splits,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DA=da, BLOCK_DB=db, BLOCK_DV=dv, HAS_B=db > 16,
                 V_FROM_K=v_from_k, UPCAST=False, PREC="tf32")
    return paged_attention._attn_kernel, sig, const, warps, stages


def _moe(fp8: bool, cfg):
    bm, bn, bk, warps, stages = cfg
    a = P["f8"] if fp8 else P["bf16"]
    sig = dict(a_ptr=a, b_ptr=a, c_ptr=P["bf16"], as_ptr=P["f32"], bs_ptr=P["f32"], w_ptr=P["f32"],
               pairs_ptr=P["i32"], block_expert_ptr=P["i32"])
    sig.update({n: "i32" for n in ("num_pairs", "N", "K", "a_sm", "b_se", "b_sn", "c_sm", "bs_se")})
    const = dict(A_DIV=4, FP8=fp8, MUL_WEIGHT=True, UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC="tf32")
    return fused_moe._moe_gemm_kernel, sig, const, warps, stages


def _gemm(block_scaled: bool, cfg, split_k: int = 1, inline: bool = False):
    bm, bn, bk, group_m, warps, stages = cfg
    sig = dict(a_ptr=P["f8"], w_ptr=P["f8"], c_ptr=P["bf16"], as_ptr=P["f32"], ws_ptr=P["f32"], bias_ptr=P["bf16"],
               part_ptr=P["f32"], cnt_ptr=P["i32"])
    sig.update({n: "i32" for n in ("M", "N", "K", "a_sm", "w_sn", "c_sm", "as_sm", "ws_sn", "k_blocks_per_split")})
    const = dict(HAS_BIAS=True, BLOCK_SCALED=block_scaled, GROUP_M=group_m, SPLIT_K=split_k, BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, PRECISE_ACC=True, INLINE_REDUCE=inline, PDL=inline)
    return fp8_gemm._fp8_gemm_kernel, sig, const, warps, stages


def _gemv(block_n: int, block_k: int, k_chunks: int, warps: int, a_mode: int = fp8_gemv.A_FP8):
    a = P["f8"] if a_mode == fp8_gemv.A_FP8 else P["bf16"]
    sig = dict(a_ptr=a, w_ptr=P["f8"], c_ptr=P["bf16"], as_ptr=P["f32"], ws_ptr=P["f32"], bias_ptr=P["bf16"],
               nw_ptr=P["bf16"])
    sig.update({n: "i32" for n in ("N", "K", "a_sm", "w_sn", "c_sm", "as_sm", "ws_sn")})
    sig.update(eps="fp32")
    const = dict(HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, K_CHUNKS=k_chunks, PDL=1, A_MODE=a_mode,
                 A_ROWS=fp8_gemv.a_rows(block_n, block_k, warps, a_mode))
    return fp8_gemv._fp8_gemv_kernel, sig, const, warps, 1


def _moe_gemv(block_n: int, block_k: int, k_chunks: int, warps: int, a_div: int, mul_weight: bool,
              a_mode: int = fp8_gemv.A_FP8):
    a = P["f8"] if a_mode == fp8_gemv.A_FP8 else P["bf16"]
    sig = dict(a_ptr=a, b_ptr=P["f8"], c_ptr=P["bf16"], as_ptr=P["f32"], bs_ptr=P["f32"], w_ptr=P["f32"],
               ids_ptr=P["i64"])
    sig.update({n: "i32" for n in ("N", "K", "a_sm", "b_se", "b_sn", "c_sm", "bs_se")})
    const = dict(A_DIV=a_div, MUL_WEIGHT=mul_weight, BLOCK_N=block_n, BLOCK_K=block_k, K_CHUNKS=k_chunks, PDL=1,
                 A_MODE=a_mode, A_ROWS=fp8_gemv.a_rows(block_n, block_k, warps, a_mode))
    return fp8_gemv._moe_gemv_kernel, sig, const, warps, 1


def _gemm_tma(cfg, precise: bool):
    from glmserve.kernels import fp8_gemm_tma

    bm, bn, bk, group_m, warps, stages = cfg
    sig = dict(a_desc=f"tensordesc<fp8e4nv[{bm}, {bk}]>", w_desc=f"tensordesc<fp8e4nv[{bn}, {bk}]>", c_ptr=P["bf16"],
               as_ptr=P["f32"], ws_ptr=P["f32"], bias_ptr=P["bf16"])
    sig.update({n: "i32" for n in ("M", "N", "K", "c_sm", "as_sm", "ws_sn")})
    const = dict(HAS_BIAS=True, GROUP_M=group_m, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISE_ACC=precise)
    return fp8_gemm_tma._fp8_gemm_tma_kernel, sig, const, warps, stages


def _mla_latent(wide: bool):
    """The default split config (NUM_SPLITS 4), or the one-split config for batches that fill the SMs."""
    if wide:
        block_n, warps, stages = mla_decode.WIDE_CONFIGS["default"]
    else:
        block_n, warps, stages, _ = mla_decode.CONFIGS["default"]
    sig = dict(q_ptr=P["bf16"], kv_ptr=P["bf16"], out_ptr=P["f32"], lse_ptr=P["f32"], page_table_ptr=P["i32"],
               seq_lens_ptr=P["i32"])
    sig.update({n: "i32" for n in ("q_st", "q_sh", "kv_ss", "o_st", "o_sh", "o_ss", "pt_stride")})
    sig.update(scale_log2="fp32", page_size="i32", min_keys="i32", H="i32", DL="i32", DR="i32")
    const = dict(NUM_SPLITS=1 if wide else 4, BLOCK_H=32, BLOCK_N=block_n, BLOCK_DL=512, BLOCK_DR=64, UPCAST=False,
                 PREFETCH=mla_decode.PREFETCH_PAGES, PREC="tf32")
    return mla_decode._mla_decode_kernel, sig, const, warps, stages


def _mla_wg(splits: int, warps: int, stages: int, q_async: bool, early_pages: bool = False):
    """The Hopper warpgroup-MMA MLA decode kernel (Gluon), GLM-4.7-Flash shapes."""
    from glmserve.kernels import mla_decode_wg

    sig = dict(q_ptr=P["bf16"], kv_ptr=P["bf16"], out_ptr=P["bf16"] if splits == 1 else P["f32"], lse_ptr=P["f32"],
               page_table_ptr=P["i32"], seq_lens_ptr=P["i32"])
    sig.update({n: "i32" for n in ("q_st", "q_sh", "kv_ss", "o_st", "o_sh", "o_ss", "pt_stride", "pt_cols")})
    sig.update(scale_log2="fp32", page_size="i32", min_keys="i32", H="i32")
    const = dict(NUM_SPLITS=splits, BH=32, DL=512, DR=64, STAGES=stages, Q_ASYNC=q_async, num_warps=warps,
                 EARLY_PAGES=early_pages)
    return mla_decode_wg._mla_decode_wg_kernel, sig, const, warps, 1


def _small_kernels():
    i32 = "i32"
    norm_args = dict(x_ptr=P["bf16"], res_ptr=P["bf16"], w_ptr=P["bf16"], y_ptr=P["bf16"], s_ptr=P["bf16"],
                     q_ptr=P["f8"], qs_ptr=P["f32"], x_stride=i32, res_stride=i32, y_stride=i32, s_stride=i32,
                     q_stride=i32, D=i32, eps="fp32", slot_stride=i32)
    yield "rms_norm add H4096", rmsnorm._rms_norm_kernel, norm_args, dict(
        HAS_RES=True, QUANT=False, PRE_ROUND=False, BLOCK_D=4096), 16, 1
    yield "rms_norm add + fp8 H2048", rmsnorm._rms_norm_kernel, norm_args, dict(
        HAS_RES=True, QUANT=True, PRE_ROUND=False, BLOCK_D=2048), 8, 1
    yield "rms_norm add 5 slots + fp8 H2048 pdl", rmsnorm._rms_norm_kernel, norm_args, dict(
        HAS_RES=True, QUANT=True, PRE_ROUND=False, BLOCK_D=2048, SLOTS=5, PDL=True), 8, 1
    yield "rope neox 96x128", rope._rope_kernel, dict(
        x_ptr=P["bf16"], cos_ptr=P["f32"], sin_ptr=P["f32"], pos_ptr=P["i64"], out_ptr=P["bf16"], x_stride_t=i32,
        x_stride_h=i32, out_stride_t=i32, out_stride_h=i32, cs_stride=i32, num_heads=i32), dict(
        HALF=32, BLOCK_HALF=32, BLOCK_H=128, INTERLEAVED=False, HAS_POS=True, REST=64, BLOCK_REST=64), 4, 1
    yield "mla_kv_write L512 R64 20 heads", mla_kv_write._mla_kv_write_kernel, dict(
        ckv_ptr=P["bf16"], w_ptr=P["bf16"], cos_ptr=P["f32"], sin_ptr=P["f32"], cache_ptr=P["bf16"], slot_ptr=P["i64"],
        q_ptr=P["bf16"], qo_ptr=P["bf16"], ckv_st=i32, cs_st=i32, cache_ss=i32, q_st=i32, q_sh=i32, qo_st=i32,
        qo_sh=i32, num_heads=i32, eps="fp32"), dict(
        L=512, BLOCK_L=512, HALF=32, BLOCK_HALF=32, BLOCK_H=32, INTERLEAVED=True, REST=0, BLOCK_REST=2), 4, 1
    yield "mla_prep L512 R64 q_a 768 fp8 pdl", mla_kv_write._mla_prep_kernel, dict(
        ckv_ptr=P["bf16"], w_ptr=P["bf16"], cos_ptr=P["f32"], sin_ptr=P["f32"], cache_ptr=P["bf16"], slot_ptr=P["i64"],
        qa_ptr=P["bf16"], qaw_ptr=P["bf16"], qay_ptr=P["bf16"], qaq_ptr=P["f8"], qas_ptr=P["f32"], ckv_st=i32,
        cs_st=i32, cache_ss=i32, qa_st=i32, qay_st=i32, qaq_st=i32, QA=i32, eps="fp32", qa_eps="fp32"), dict(
        L=512, BLOCK_L=512, HALF=32, BLOCK_HALF=32, INTERLEAVED=True, REST=0, BLOCK_REST=2, BLOCK_QA=1024,
        QUANT=True, PRE_ROUND=False, PDL=True), 4, 1
    yield "gqa_kv_write 96/8 heads D128 rot64 qk-norm", gqa_kv_write._gqa_kv_write_kernel, dict(
        q_ptr=P["bf16"], k_ptr=P["bf16"], v_ptr=P["bf16"], qw_ptr=P["bf16"], kw_ptr=P["bf16"], cos_ptr=P["f32"],
        sin_ptr=P["f32"], qo_ptr=P["bf16"], kc_ptr=P["bf16"], vc_ptr=P["bf16"], slot_ptr=P["i64"],
        **{n: i32 for n in ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "qo_st", "qo_sh", "kc_ss", "kc_sh",
                            "vc_ss", "vc_sh", "cs_st", "num_q", "num_kv")}, eps="fp32"), dict(
        D=128, BLOCK_D=128, HALF=32, BLOCK_HALF=32, REST=64, BLOCK_REST=64, BLOCK_HQ=128, BLOCK_HKV=8, HAS_NORM=True,
        INTERLEAVED=False), gqa_kv_write._warps(96, 128), 1
    yield "silu_mul_fp8 I1536", act_quant._silu_mul_kernel, dict(
        x_ptr=P["bf16"], out_ptr=P["f8"], scale_ptr=P["f32"], x_stride=i32, out_stride=i32, I=i32), dict(
        QUANT=True, BLOCK=2048, NUM_CHUNKS=1, PRE_ROUND=False), 8, 1
    yield "quant_fp8 per-token 4096", act_quant._quant_group_kernel, dict(
        x_ptr=P["bf16"], q_ptr=P["f8"], s_ptr=P["f32"], x_stride=i32, q_stride=i32, s_stride=i32, K=i32), dict(
        GROUP=4096, BLOCK=4096, PRE_ROUND=False), 16, 1
    route_args = dict(logits_ptr=P["f32"], bias_ptr=P["f32"], w_ptr=P["f32"], ids_ptr=P["i64"], T=i32, E=i32,
                      scaling="fp32")
    yield "moe_route E160 k8 + shared slot", moe_route._route_kernel, route_args, dict(
        TOP_K=8, SHARED=1, N_GROUP=1, TOPK_GROUP=1, NORM=True, BLOCK_T=1, BLOCK_E=256, K_PAD=16), 2, 1
    yield "moe_route E64 k4 + shared slot", moe_route._route_kernel, route_args, dict(
        TOP_K=4, SHARED=1, N_GROUP=1, TOPK_GROUP=1, NORM=True, BLOCK_T=1, BLOCK_E=64, K_PAD=8), 1, 1
    gemm_route_args = dict(x_ptr=P["bf16"], gate_ptr=P["bf16"], bias_ptr=P["f32"], w_ptr=P["f32"], ids_ptr=P["i64"],
                           T=i32, E=i32, H=i32, x_st=i32, scaling="fp32")
    for e, k, bk in ((64, 4, 128), (160, 8, 32)):  # moe_route's BLOCK_K rule: gate tile <= 16 KB a stage
        name = f"moe_route + router GEMM E{e} k{k} + shared slot pdl"
        yield name, moe_route._gemm_route_kernel, gemm_route_args, dict(
            TOP_K=k, SHARED=1, N_GROUP=1, TOPK_GROUP=1, NORM=True, BLOCK_T=16, BLOCK_E=triton.next_power_of_2(e),
            BLOCK_K=bk, K_PAD=16 if k == 8 else 8, UPCAST=False, PDL=True), moe_route.GEMM_ROUTE_WARPS, 3
    route_align_args = dict(gemm_route_args, part_ptr=P["f32"], cnt_ptr=P["i32"], pairs_ptr=P["i32"],
                            block_expert_ptr=P["i32"], cap=i32, k_blocks_per_split=i32)
    for e, k, bk, splits, sel_t in ((64, 4, 128, 16, 1), (64, 4, 128, 16, 16), (160, 8, 32, 32, 4)):
        const = dict(TOP_K=k, SHARED=1, N_GROUP=1, TOPK_GROUP=1, NORM=True, BLOCK_T=16,
                     BLOCK_E=triton.next_power_of_2(e), BLOCK_K=bk, K_PAD=16 if k == 8 else 8, SPLITS=splits,
                     BLOCK_S=triton.next_power_of_2(e + 1), BLOCK_M=16, FILL=moe_route_align.FILL, UPCAST=False,
                     SEL_T=sel_t, PDL=True)
        name = f"moe_route_align E{e} k{k} T<={sel_t} + shared slot"
        yield f"{name} arrival pdl", moe_route_align._route_align_kernel, route_align_args, const, 4, 1
        if sel_t == 1:  # moe_route_align.RELAXED_RESET at batch 1, where it is meant to pay
            yield (f"{name} relaxed reset arrival pdl", moe_route_align._route_align_kernel, route_align_args,
                   dict(const, RELAXED_RESET=True), 4, 1)
            yield (f"{name} no align arrival pdl", moe_route_align._route_align_kernel, route_align_args,
                   dict(const, ALIGN=False), 4, 1)
    # the post-attention norm inside the launch (moe_route_align.NORM_MAX_T, SEL_T * BLOCK_H <= NORM_MAX_ELEMS):
    # GLM-4.7-Flash's H 2048 at T 1 / 4, GLM-4.5's 5120 (BLOCK_H 8192) at T 1
    norm_args = dict(route_align_args, res_ptr=P["bf16"], nw_ptr=P["bf16"], y_ptr=P["bf16"], s_ptr=P["bf16"],
                     q_ptr=P["f8"], qs_ptr=P["f32"], eps="fp32")
    for e, k, bk, splits, sel_t, block_h in ((64, 4, 128, 16, 1, 2048), (64, 4, 128, 16, 4, 2048),
                                             (160, 8, 32, 32, 1, 8192)):
        const = dict(TOP_K=k, SHARED=1, N_GROUP=1, TOPK_GROUP=1, NORM=True, BLOCK_T=16,
                     BLOCK_E=triton.next_power_of_2(e), BLOCK_K=bk, K_PAD=16 if k == 8 else 8, SPLITS=splits,
                     BLOCK_S=triton.next_power_of_2(e + 1), BLOCK_M=16, FILL=moe_route_align.FILL, UPCAST=False,
                     SEL_T=sel_t, PDL=True, ALIGN=e > 64, NORM_IN=True, BLOCK_H=block_h, QUANT=True)
        yield (f"moe_route_align E{e} k{k} T<={sel_t} norm in arrival pdl", moe_route_align._route_align_kernel,
               norm_args, const, 4, 1)
    absorb = [(k_rows, fp8, "", mla_absorb.CONFIGS) for k_rows in (True, False) for fp8 in (True, False)]
    absorb += [(k_rows, True, " large", mla_absorb.LARGE_CONFIGS) for k_rows in (True, False)]
    for k_rows, fp8, size, table in absorb:
        bm, bn, bk, warps, stages = table[k_rows]
        yield f"mla_absorb{size} {'W_UK' if k_rows else 'W_UV'} {'fp8' if fp8 else 'bf16'} pdl", \
            mla_absorb._mla_absorb_kernel, dict(
                a_ptr=P["bf16"], w_ptr=P["f8" if fp8 else "bf16"], s_ptr=P["f32"], o_ptr=P["bf16"],
                **{n: i32 for n in ("T", "K", "N", "a_st", "a_sh", "w_sh", "w_sr", "s_sh", "o_st", "o_sh")}), dict(
                K_ROWS=k_rows, FP8=fp8, UPCAST=False, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=True), \
            warps, stages
    bm, bn, bk, warps, stages = mla_absorb.CONFIGS[True]
    yield "mla_absorb W_UK fp8 + q_pe RoPE pdl", mla_absorb._mla_absorb_kernel, dict(
        a_ptr=P["bf16"], w_ptr=P["f8"], s_ptr=P["f32"], o_ptr=P["bf16"], qpe_ptr=P["bf16"], cos_ptr=P["f32"],
        sin_ptr=P["f32"], qo_ptr=P["bf16"], **{n: i32 for n in ("T", "K", "N", "a_st", "a_sh", "w_sh", "w_sr", "s_sh",
                                                               "o_st", "o_sh", "qpe_st", "qpe_sh", "qo_st", "qo_sh",
                                                               "cs_st")}), dict(
        K_ROWS=True, FP8=True, UPCAST=False, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=True, ROPE=True,
        HALF=32, BLOCK_HALF=32, INTERLEAVED=True, REST=0, BLOCK_REST=2), warps, stages
    for size, table in (("", mla_absorb.CONFIGS), (" large", mla_absorb.LARGE_CONFIGS)):  # mla.KV_WRITE_IN_ABSORB_MAX_T
        bm, bn, bk, warps, stages = table[True]
        yield f"mla_absorb{size} W_UK fp8 + kv write pdl", mla_absorb._mla_absorb_kernel, dict(
            a_ptr=P["bf16"], w_ptr=P["f8"], s_ptr=P["f32"], o_ptr=P["bf16"], qpe_ptr=P["bf16"], cos_ptr=P["f32"],
            sin_ptr=P["f32"], qo_ptr=P["bf16"], ckv_ptr=P["bf16"], kvw_ptr=P["bf16"], cache_ptr=P["bf16"],
            slot_ptr=P["i64"], kv_eps="fp32", **{n: i32 for n in (
                "T", "K", "N", "a_st", "a_sh", "w_sh", "w_sr", "s_sh", "o_st", "o_sh", "qpe_st", "qpe_sh", "qo_st",
                "qo_sh", "cs_st", "ckv_st", "cache_ss")}), dict(
            K_ROWS=True, FP8=True, UPCAST=False, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=True,
            HALF=32, BLOCK_HALF=32, INTERLEAVED=True, REST=0, BLOCK_REST=2, KV_WRITE=True, L=512, BLOCK_L=512,
            BLOCK_H=32), warps, stages
    yield "kv gather", kv_pages._copy_pages_kernel, dict(
        src_ptr=P["bf16"], dst_ptr=P["bf16"], ids_ptr=P["i64"], num_pages=i32, n=i32, CHUNK=i32), dict(
        SCATTER=False, BLOCK=4096), 4, 1
    for e, k, dense in ((64, 4, 1), (160, 8, 1), (160, 8, 0)):  # + the fused shared expert (dense) or not
        yield f"moe_align one launch E{e} k{k} dense_last {dense}", moe_align._align_kernel, dict(
            ids_ptr=P["i64"], pairs_ptr=P["i32"], block_expert_ptr=P["i32"], num_pairs=i32, cap=i32, E=i32), dict(
            BLOCK_M=32, BLOCK_E=triton.next_power_of_2(e), CHUNK=moe_align.CHUNK,
            DENSE_LAST=dense, K=k + dense), 4, 1
    yield "moe sum slots k8", fused_moe._sum_slots_kernel, dict(src_ptr=P["bf16"], out_ptr=P["bf16"], H=i32), dict(
        TOP_K=8, BLOCK_H=1024), 4, 1
    yield "attn merge", paged_attention._merge_kernel, dict(
        part_ptr=P["f32"], lse_ptr=P["f32"], out_ptr=P["bf16"], DV=i32, o_st=i32, o_sh=i32), dict(
        NUM_HEADS=20, NUM_SPLITS=5, BLOCK_S=8, BLOCK_DV=512), 4, 1
    yield "attn merge 128 splits (mla_decode.MAX_SPLITS)", paged_attention._merge_kernel, dict(
        part_ptr=P["f32"], lse_ptr=P["f32"], out_ptr=P["bf16"], DV=i32, o_st=i32, o_sh=i32), dict(
        NUM_HEADS=20, NUM_SPLITS=128, BLOCK_S=128, BLOCK_DV=512), 4, 1


def cases():
    yield from _small_kernels()
    gqa, mla = paged_attention.CONFIGS, paged_attention.CONFIGS
    yield ("attn gqa decode", *_attn(False, 1, *gqa[("default", "gqa", "decode")], (128, 16, 128)))
    yield ("attn gqa prefill", *_attn(False, 1, *gqa[("default", "gqa", "prefill")], (128, 16, 128)))
    # MLA's expanded prefill (shared/model/layers/mla.py): Dk = 192 + 64, Dv = 256, one query head per KV head
    for phase in ("decode", "prefill"):
        yield (f"attn gqa_wide {phase} (MLA expanded)",
               *_attn(False, 1, *gqa[("default", "gqa_wide", phase)], (256, 16, 256), (1, 20)))
    yield ("attn mla decode split", *_attn(True, 5, *mla[("default", "mla", "decode")], (512, 64, 512)))
    yield ("mla decode latent", *_mla_latent(False))
    yield ("mla decode latent wide", *_mla_latent(True))
    for splits in (1, 4):  # the shipped config (mla_decode.WG_CONFIGS): 4 warps, 2 stages; q by registers or cp.async
        for q_async in (False, True):
            yield (f"mla decode wgmma (gluon) splits {splits} q_async {int(q_async)}",
                   *_mla_wg(splits, *mla_decode.WG_CONFIGS["default"][1:], q_async))
    yield ("mla decode wgmma (gluon) splits 1 q_async 1 early pages",
           *_mla_wg(1, *mla_decode.WG_CONFIGS["default"][1:], True, True))
    # one stage (mla_decode.WG_TWO_PER_SM): 112 KB of shared memory and <= 256 registers, so two programs an SM
    yield "mla decode wgmma (gluon) one stage", *_mla_wg(1, 4, 1, True)
    for key, cfg in fp8_gemm.CONFIGS.items():
        if key[0] != "cpu":
            yield (f"fp8_gemm {key}", *_gemm(False, cfg))
    yield ("fp8_gemm block128 large", *_gemm(True, fp8_gemm.CONFIGS[("default", "large")]))
    for key, cfg in fp8_gemm.TMA_CONFIGS.items():
        yield (f"fp8_gemm tma {key}", *_gemm_tma(cfg, key != "fast"))
    # GLM-4.7-Flash's q_a + kv_a, o_proj, q_b at M 1; GLM-4.5-Air's K 4096
    for bn, bk, chunks in ((1, 2048, 1), (2, 2048, 3), (4, 1024, 1), (8, 2048, 2)):
        yield (f"fp8_gemv {bn}x{bk} x{chunks} pdl", *_gemv(bn, bk, chunks, fp8_gemv.WARPS))
    yield ("moe_gemv gate_up 8x2048 pdl", *_moe_gemv(8, 2048, 1, fp8_gemv.WARPS, 5, False))  # Flash w13, K 2048
    yield ("moe_gemv down 8x2048 pdl", *_moe_gemv(8, 2048, 1, fp8_gemv.WARPS, 1, True))  # Flash w2, K 1536
    # the quantizing A modes: o_proj's 16-bit input (K 5120 at M 1: 2 x 2048 x 3), the down GEMV's SiLU-mul
    yield ("fp8_gemv quant 2x2048 x3 pdl", *_gemv(2, 2048, 3, fp8_gemv.WARPS, fp8_gemv.A_QUANT))
    yield ("fp8_gemv norm 4x1024 pdl", *_gemv(4, 1024, 1, fp8_gemv.WARPS, fp8_gemv.A_NORM))  # q_b: K 768
    yield ("moe_gemv down silu 8x2048 pdl", *_moe_gemv(8, 2048, 1, fp8_gemv.WARPS, 1, True, fp8_gemv.A_SILU))
    fn, sig, const, warps, stages = _moe_gemv(8, 2048, 1, fp8_gemv.WARPS, 1, True, fp8_gemv.A_SILU)
    sig = dict(sig, cnt_ptr=P["i32"], res_ptr=P["bf16"], nw_ptr=P["bf16"], y_ptr=P["bf16"], s_ptr=P["bf16"],
               q_ptr=P["f8"], qs_ptr=P["f32"], eps="fp32")
    # the next layer's input norm by the token's last program (fused_moe.NEXT_NORM_MAX_T): Flash's 5 slots, H 2048
    yield ("moe_gemv down silu next norm arrival pdl", fn, sig,
           dict(const, NEXT_NORM=True, SLOTS=5, BLOCK_H=2048, QUANT=True), warps, stages)
    yield ("fp8_gemm split-k 4 small_narrow", *_gemm(False, fp8_gemm.CONFIGS[("default", "small_narrow")], 4))
    for key in ("small", "small_narrow"):
        cfg = fp8_gemm.CONFIGS[("default", key)]
        yield (f"fp8_gemm split-k 8 inline {key} arrival pdl", *_gemm(False, cfg, 8, True))
    fn, sig, const, warps, stages = _gemm(False, fp8_gemm.CONFIGS[("default", "small")], 8, True)
    yield "fp8_gemm split-k 8 inline small early scales arrival pdl", fn, sig, dict(const, EARLY=True), warps, stages
    yield "fp8_gemm split-k reduce", fp8_gemm._splitk_reduce_kernel, dict(
        part_ptr=P["f32"], c_ptr=P["bf16"], as_ptr=P["f32"], ws_ptr=P["f32"], bias_ptr=P["bf16"], M="i32", N="i32",
        c_sm="i32", as_sm="i32", ws_sn="i32"), dict(SPLIT_K=4, SCALE=True, HAS_BIAS=True, BLOCK_N=1024), 4, 1
    for key, cfg in fused_moe.CONFIGS.items():
        yield (f"fused_moe {key}", *_moe(key[2] == "fp8", cfg))
    fn, sig, const, warps, stages = _moe(True, fused_moe.CONFIGS[("H100", "decode", "fp8")])
    yield "fused_moe H100 decode fp8 pdl", fn, sig, dict(const, PDL=True), warps, stages
    yield "fused_moe H100 decode fp8 pdl late", fn, sig, dict(const, PDL=2), warps, stages  # _common.PDL_LATE
    yield "fused_moe H100 decode fp8 pdl early loads", fn, sig, dict(const, PDL=True, EARLY=True), warps, stages


def _resources(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {"regs": int(m[1]), "stack": int(m[2]), "local": int(m[4])} if m else {}


# Integer args that are not multiples of 16 at run time; every other pointer and int gets the
# divisibility-by-16 hint that the JIT adds on its own for aligned pointers and such ints.
NOT_DIV16 = {"M", "num_pairs", "n", "E", "num_heads", "num_pages", "DB", "cap", "k_blocks_per_split", "T"}
SMEM_LIMIT = 227 * 1024  # Hopper, per block
# Known small spills kept on purpose: MLA latent n32 w4 s3 spills 112 B here (triton 3.9) yet measured
# fastest on the H100 (triton 3.6, KERNEL_NOTES v7): two CTAs per SM beat the spill-free 8-warp configs.
# The one-stage MLA kernel spills ~150 B of loop-invariant addresses (hoisted out of the tile loop; reloaded from L1),
# kept for its A/B (mla_decode.WG_TWO_PER_SM, off): two programs an SM need its 112 KB of shared memory.
ALLOWED_STACK = {"mla decode latent": 256, "mla decode latent wide": 256, "mla decode wgmma (gluon) one stage": 192}
SMEM_TWO_PER_SM = 233472 // 2 - 1024  # H100 / H200: two programs an SM each get at most this (1 KB reserved each)


def compile_one(fn, sig, const, warps, stages):
    # parameters left at their defaults (constexprs PDL, SLOTS, PREC...; optional pointers None) must still be
    # named for an ASTSource: as constants
    defaults = {p.name: p.default for p in getattr(fn, "params", ())
                if p.name not in sig and p.name not in const and p.default is not inspect.Parameter.empty}
    const = dict(defaults, **const)
    hinted = [n for n, t in sig.items() if t.startswith("*") or (t == "i32" and n not in NOT_DIV16)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        sig = dict(sig, **{n: "constexpr" for n in const})
        src = GluonASTSource(fn, sig, const, attrs)
    else:
        src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def main(argv: list[str] | None = None) -> int:
    """Prints one line per kernel; returns 1 if any failed to compile, spilled, or overflowed smem."""
    bad = 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", default="0/1", help="I/N: compile every N-th case from the I-th")
    i, n = (int(v) for v in ap.parse_args(argv).shard.split("/"))
    for name, fn, sig, const, warps, stages in itertools.islice(cases(), i, None, n):
        try:
            k = compile_one(fn, sig, const, warps, stages)
        except Exception as e:  # noqa: BLE001
            print(f"{name:42s} FAILED {type(e).__name__}: {str(e)[:300]}")
            bad += 1
            continue
        res = _resources(k.asm["cubin"])
        ok = (res.get("stack", 1) <= ALLOWED_STACK.get(name, 0) and res.get("local", 1) == 0
              and k.metadata.shared <= (SMEM_TWO_PER_SM if name.endswith(" one stage") else SMEM_LIMIT))
        if name.endswith(" pdl"):  # programmatic dependent launch: the trigger and the wait are in the PTX
            ok = ok and "griddepcontrol.launch_dependents" in k.asm["ptx"] and "griddepcontrol.wait" in k.asm["ptx"]
        if name.endswith(" pdl late"):  # the wait, no early trigger
            ok = ok and "griddepcontrol.wait" in k.asm["ptx"] and "launch_dependents" not in k.asm["ptx"]
        if " arrival" in name:  # last-arriver reduction: barrier, gpu-scope acq_rel count, partials read from L2
            ok = ok and all(s in k.asm["ptx"] for s in ("bar.sync", "atom.global.gpu.acq_rel.add", "ld.global.cg"))
        bad += not ok
        print(f"{name:42s} {'ok ' if ok else 'BAD'} smem {k.metadata.shared:6d} B  {res}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
