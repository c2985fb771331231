"""FP8 (e4m3) GEMMs for FP8 checkpoints: Triton on CUDA, torch references beside; every worker rank.

  y [M, N] = (A_q [M, K] . W_q [N, K]^T) * scales (+ bias), out in bf16 (or the activation dtype)
- per-channel (GLM-4.x FP8, compressed-tensors): A scale per token [M, 1], W scale per row [N, 1];
  the scales factor out of the K sum, so they multiply the fp32 accumulator once at the end.
- block-scaled: W scale per 128x128 block [cdiv(N,128), cdiv(K,128)], A scale per 1x128 group
  [M, cdiv(K,128)]; BLOCK_K = 128 so each K step scales its partial product before adding it.
FLOPs 2MNK; bytes MK + NK + 2MN. Tiles are walked in GROUP_M-row bands so W tiles stay in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import (FP8_DTYPE, arrival_counters, cc_major, check, gpu_name, k_splits, new_out,
                                      pdl_enter, pdl_kw, sm_count, splitk_arrive, splitk_sum)
from glmserve.kernels.act_quant import quant_fp8_group, quant_fp8_per_token
from glmserve.kernels.fp8_gemm_tma import fp8_gemm_tma, tma_ok
from glmserve.kernels import fp8_gemv as gemv
from glmserve.kernels.fp8_gemv import fp8_gemv
from glmserve.kernels.rmsnorm import rms_norm_fp8


def fp8_gemm_ref(a_q, a_scale, w_q, w_scale, bias, out_dtype, block: int = 0) -> torch.Tensor:
    """Dequantize and multiply in fp32. block=0: per-token x per-channel; block=128: block-scaled."""
    a = a_q.float()
    w = w_q.float()
    if block:
        a = a * a_scale.repeat_interleave(block, dim=1)[:, : a.shape[1]]
        w = w * w_scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
        y = a @ w.t()
    else:
        y = (a @ w.t()) * a_scale.float() * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, part_ptr, cnt_ptr, M, N, K,
    a_sm, w_sn, c_sm, as_sm, ws_sn, k_blocks_per_split,
    HAS_BIAS: tl.constexpr, BLOCK_SCALED: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISE_ACC: tl.constexpr,
    INLINE_REDUCE: tl.constexpr = False, PDL: tl.constexpr = False, EARLY: tl.constexpr = False,
):
    """Program (tile, k split): SPLIT_K > 1 writes its fp32 partial to part[split] (scaled per K block
    when BLOCK_SCALED, raw otherwise); then either _splitk_reduce_kernel finishes the tile, or
    (INLINE_REDUCE) the tile's last program to arrive does: cnt[tile] counts the tile's stored partials
    (0 between launches: the finisher resets it), and the finisher sums part[0..SPLIT_K) in split order,
    as the reduce kernel does, so both give the same bits. EARLY: the epilogue's per-channel scales and bias
    load before the K loop (in flight while it streams W), and the finisher's counter reset is relaxed, so no
    load or store of the epilogue waits on it (same bits)."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_band
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_band
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kb_lo = tl.program_id(1) * k_blocks_per_split
    kb_hi = tl.minimum(kb_lo + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
    rk = tl.arange(0, BLOCK_K)
    a_p = a_ptr + rm.to(tl.int64)[:, None] * a_sm + kb_lo * BLOCK_K + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_p = w_ptr + rn.to(tl.int64)[None, :] * w_sn + kb_lo * BLOCK_K + rk[:, None]  # [BLOCK_K, BLOCK_N] = W^T
    if EARLY and not BLOCK_SCALED:
        sa_e = tl.load(as_ptr + rm * as_sm, mask=rm < M, other=0.0)
        sw_e = tl.load(ws_ptr + rn * ws_sn, mask=rn < N, other=0.0)
    if EARLY and HAS_BIAS:
        bias_e = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k_ok = rk < K - kb * BLOCK_K
        a = tl.load(a_p, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_p, mask=(rn[None, :] < N) & k_ok[:, None], other=0.0)
        if BLOCK_SCALED:
            sa = tl.load(as_ptr + rm * as_sm + kb, mask=rm < M, other=0.0)
            sw = tl.load(ws_ptr + (rn // 128) * ws_sn + kb, mask=rn < N, other=0.0)
            acc += tl.dot(a, w) * sa[:, None] * sw[None, :]
        elif PRECISE_ACC:  # sm_90 fp8 MMA accumulates in reduced precision: add into fp32 every BLOCK_K
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, w, acc)
        a_p += BLOCK_K
        w_p += BLOCK_K
    if SPLIT_K > 1:
        tile_p = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tile_ok = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(tile_p + tl.program_id(1).to(tl.int64) * M * N, acc, mask=tile_ok)
        if not INLINE_REDUCE:
            return
        if splitk_arrive(cnt_ptr + pid) < SPLIT_K - 1:
            return  # not the last of the tile's splits
        acc = splitk_sum(tile_p, tile_ok, cnt_ptr + pid, M, N, SPLIT_K, BLOCK_M, BLOCK_N, EARLY)
    if not BLOCK_SCALED:
        if EARLY:
            acc = acc * sa_e[:, None] * sw_e[None, :]
        else:
            sa = tl.load(as_ptr + rm * as_sm, mask=rm < M, other=0.0)
            sw = tl.load(ws_ptr + rn * ws_sn, mask=rn < N, other=0.0)
            acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        if EARLY:
            acc += bias_e[None, :]
        else:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_p = c_ptr + rm.to(tl.int64)[:, None] * c_sm + rn[None, :]
    tl.store(c_p, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _splitk_reduce_kernel(part_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, c_sm, as_sm, ws_sn,
                          SPLIT_K: tl.constexpr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          PDL: tl.constexpr = False):
    """c[m, n] = (sum_s part[s, m, n]) (* s_a[m] * s_w[n] per-channel) (+ bias[n])."""
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + rn, mask=rn < N, other=0.0)
    if SCALE:
        acc = acc * tl.load(as_ptr + m * as_sm) * tl.load(ws_ptr + rn * ws_sn, mask=rn < N, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(c_ptr + m * c_sm + rn, acc.to(c_ptr.dtype.element_ty), mask=rn < N)


# Full-precision fp8 accumulation (as torch._scaled_mm without use_fast_accum); False = the MMA's own
# reduced-precision accumulation over all of K (faster, less exact).
PRECISE_ACC = True

# Launch configs as data: (gpu, M bucket) -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# M buckets: "small" M <= 64 (decode), "mid" M <= 512, "large". Not yet tuned on hardware (see
# bench/KERNEL_NOTES.md); chosen so the offline sm_90 compile (kernels/aot_check.py) shows no spills.
CONFIGS: dict[tuple[str, str], tuple[int, ...]] = {
    ("default", "small"): (16, 64, 128, 1, 4, 4),
    ("default", "small_narrow"): (16, 32, 128, 1, 4, 4),  # small M and narrow N: more programs in flight
    # mid: 64x64 tiles (twice the programs of 64x128): H200, M 256 on GLM-4.7-Flash's five per-layer GEMMs
    # 68 -> 52 us in all (bench/decode_sweep.py, bench/gpu_results/h200_run9_sweep)
    ("default", "mid"): (64, 64, 128, 8, 4, 4),
    ("default", "large"): (128, 128, 128, 8, 8, 4),
    # 128x256 tiles spill 200 B/thread with PRECISE_ACC (two 128x256 fp32 fragments): 128x128 on Hopper
    ("H100", "large"): (128, 128, 128, 8, 8, 4),
    ("H200", "large"): (128, 128, 128, 8, 8, 4),
    ("cpu", "small"): (16, 32, 32, 2, 4, 1),
    ("cpu", "mid"): (16, 32, 32, 2, 4, 1),
    ("cpu", "large"): (16, 32, 32, 2, 4, 1),
}


def _config(device, m: int, n: int, block_scaled: bool) -> tuple[int, ...]:
    """Table entry for the M bucket; at decode sizes (weight-bound) a grid under two programs per SM
    switches to BLOCK_N 32 so more weight bytes are in flight."""
    bucket = "small" if m <= 64 else ("mid" if m <= 512 else "large")
    name = gpu_name(device)
    table_name = "cpu" if name == "cpu" else "default"
    cfg = CONFIGS.get((name, bucket)) or CONFIGS[(table_name, bucket)]
    if bucket == "small" and name != "cpu":
        sms = sm_count(device)
        if triton.cdiv(m, cfg[0]) * triton.cdiv(n, cfg[1]) < 2 * sms:
            cfg = CONFIGS.get((name, "small_narrow")) or CONFIGS[("default", "small_narrow")]
    if block_scaled and cfg[2] != 128:
        cfg = (*cfg[:2], 128, *cfg[3:])  # one K step per scale group
    return cfg


def _check_args(a_q, a_scale, w_q, w_scale, bias, block: int) -> None:
    m, k = a_q.shape
    n = w_q.shape[0]
    check(a_q.dtype == FP8_DTYPE and w_q.dtype == FP8_DTYPE, "operands must be float8_e4m3fn")
    check(w_q.shape[1] == k and a_q.stride(1) == 1 and w_q.stride(1) == 1, "K must match and be contiguous")
    check(block in (0, 128), "block must be 0 (per-channel) or 128")
    kb, nb = triton.cdiv(k, 128), triton.cdiv(n, 128)
    want_a = (m, kb) if block else (m, 1)
    want_w = (nb, kb) if block else (n, 1)
    check(tuple(a_scale.shape) == want_a and tuple(w_scale.shape) == want_w, f"scales must be {want_a}, {want_w}")
    check(a_scale.dtype == w_scale.dtype == torch.float32, "scales must be fp32")
    check(bias is None or (bias.shape == (n,) and bias.is_contiguous()), "bias must be [N]")


def fp8_gemm(a_q, a_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, block: int = 0,
             split_k: int | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """See the module docstring. a_q [M, K], w_q [N, K] e4m3 with contiguous K; block in {0, 128};
    split_k None = automatic (splits K only for weight-bound decode shapes that underfill the GPU);
    config: a pointer-kernel launch config instead of the table's (bench/decode_sweep.py)."""
    _check_args(a_q, a_scale, w_q, w_scale, bias, block)
    m, k = a_q.shape
    n = w_q.shape[0]
    a_scale, w_scale = a_scale.contiguous(), w_scale.contiguous()
    if config is None and split_k is None and _use_scaled_mm(a_q, m, n, k, block, out_dtype):
        # cuBLAS / CUTLASS rowwise FP8 (fp32 accumulation, as PRECISE_ACC); bias added after (rowwise + bias
        # is not supported on every torch build)
        y = torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale.view(1, n), out_dtype=out_dtype)
        return y if bias is None else y.add_(bias)
    out = new_out((m, n), out_dtype, a_q.device)
    if m == 0:
        return out
    if config is None and split_k is None and _use_gemv(m, block, a_q.device):
        return fp8_gemv(a_q, a_scale, w_q, w_scale, bias, out)
    if config is None and _use_tma(a_q, w_q, m, block, split_k):
        cfg = tma_config(a_q.device, m, n, PRECISE_ACC, k)
        return fp8_gemm_tma(a_q, a_scale, w_q, w_scale, bias, out, cfg, PRECISE_ACC)
    bm, bn, bk, group_m, warps, stages = config or _config(a_q.device, m, n, bool(block))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_blocks = triton.cdiv(k, bk)
    splits, per_split = k_splits(k_blocks, split_k or _auto_split_k(a_q.device, m, tiles, k_blocks))
    part = new_out((splits, m, n), torch.float32, a_q.device) if splits > 1 else out
    counters = arrival_counters(a_q.device, tiles) if splits > 1 and SPLITK_INLINE else None
    bias_arg = bias if bias is not None else w_scale
    _fp8_gemm_kernel[(tiles, splits)](
        a_q, w_q, out, a_scale, w_scale, bias_arg, part, counters if counters is not None else part, m, n, k,
        a_q.stride(0), w_q.stride(0), out.stride(0), a_scale.stride(0), w_scale.stride(0), per_split,
        HAS_BIAS=bias is not None, BLOCK_SCALED=bool(block), GROUP_M=group_m, SPLIT_K=splits,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISE_ACC=PRECISE_ACC, INLINE_REDUCE=counters is not None,
        EARLY=EARLY_SCALES, num_warps=warps, num_stages=stages, **pdl_kw(a_q.device, m),
    )
    if splits > 1 and counters is None:
        block_n = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
            part, out, a_scale, w_scale, bias_arg, m, n, out.stride(0), a_scale.stride(0), w_scale.stride(0),
            SPLIT_K=splits, SCALE=not block, HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=4,
            **pdl_kw(out.device, m),
        )
    return out


# Split-K GEMMs finish their tiles in the GEMM kernel (the last split to arrive sums the partials) instead of
# a second launch, _splitk_reduce_kernel (1.7 us a launch, 2 a layer at batch 1 on an H100, H100 run 29).
# H100 run 30 (bench/gpu_suite.sh h100m, FP8 GLM-4.7-Flash step): on together with TMA_MID_M and
# fused_moe.BOUND_GRID, B 1 / 128 / 256 4.04 / 15.88 / 19.21 ms against 4.12-4.14 / 16.09 / 19.47-19.53 with
# all three off. False: bench/profile_step.py --splitk kernel. Counters: _common.arrival_counters, one a tile.
SPLITK_INLINE = True
# The pointer kernel's epilogue scales and bias loaded before its K loop, and inline split-K's counter reset relaxed
# (_fp8_gemm_kernel's EARLY), so the epilogue (the last split's, with inline split-K) does not start with a
# dependent global round trip, nor wait for the reset's (an acq_rel atomic orders every later access). Same bits
# (tests). H100 run 35 (bench/ab_step.py --switch gemm_early, FP8 GLM-4.7-Flash step, ctx 640; median graph ms
# on / off over the five samples of two processes): B 1 3.786 / 3.814 (lower in each of the 5 pairs), B 64 14.636 /
# 14.646 (one process), B 256 18.714 / 18.754 (within the ~0.05 ms spread), logits bit-equal.
EARLY_SCALES = True

# Per-channel GEMMs with M <= GEMV_MAX_M on CUDA: kernels/fp8_gemv.py (one program a row and N block over all of K,
# no MMA tile, no split-K) instead of the MMA kernel with split-K. Written for B 1-4 decode, where the three dense
# GEMMs a layer take 4.8 / 4.1 / 7.7 us for 2.75 / 3.9 / 10.5 MB (H100 run 34), 0.2-0.45 of the copy ceiling.
# H100 run 42 (in-process A/B, median graph ms on / off at M <= 4): B 1 3.618 / 3.806, B 2 4.321 / 4.418, B 4 5.950 /
# 5.669 -- at M 4 each program's four rows cost more than the MMA tile's padding (sweep: o_proj 12.9 vs 7.5 us), so
# the GEMV takes M <= 2. 0: off (bench/ab_step.py --switch gemv sets 4 / 0).
GEMV_MAX_M = 2


def _use_gemv(m: int, block: int, device: torch.device) -> bool:
    return not block and m <= GEMV_MAX_M and device.type == "cuda"


# Per-channel GEMMs with M > 512 on Hopper: TMA kernel (kernels/fp8_gemm_tma.py); TMA_LARGE = False keeps
# the pointer kernel. (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), from the H100 sweep
# (bench/KERNEL_NOTES.md v7): 256x128 tiles when they fill the SMs, else 128x128 with 256-deep K steps;
# "fast" is for PRECISE_ACC = False (128x256 spills with the precise partial accumulator).
TMA_LARGE = True
TMA_CONFIGS: dict[str, tuple[int, ...]] = {
    "big": (256, 128, 128, 8, 8, 4),
    "narrow": (128, 128, 256, 8, 8, 3),
    "fast": (128, 256, 128, 8, 8, 3),
    "mid": (64, 64, 256, 8, 4, 4),
}
# Per-channel GEMMs with TMA_MID_M[0] < M <= TMA_MID_M[1] and K >= TMA_MID_MIN_K on Hopper: the TMA kernel at
# TMA_CONFIGS["mid"] (None: the pointer kernel's "mid" rule). H100 run 29 (bench.decode_sweep --only dense, L2-cold
# graphs), GLM-4.7-Flash's decode GEMMs: o_proj (N 2048, K 5120) at M 128 / 256 13.8 / 13.9 -> 10.2 / 10.4 us,
# q_a + kv_a (N 1344, K 2048) 6.4 / 6.7 -> 5.6 / 5.6; q_b (K 768) loses (M 256: 6.2 -> 9.5), so K >= 2048 only.
# In the decode step's CUDA graphs (host descriptors baked into the graph; GPU test
# test_fp8_gemm_tma_mid_in_a_cuda_graph): on with SPLITK_INLINE, see there (H100 run 30). None: the pointer
# kernel (bench/profile_step.py --tma_mid off).
TMA_MID_ON = (64, 512)
TMA_MID_M: tuple[int, int] | None = TMA_MID_ON
TMA_MID_MIN_K = 2048


def tma_config(device, m: int, n: int, precise: bool, k: int = 0) -> tuple[int, ...]:
    if _tma_mid(m, k):
        return TMA_CONFIGS["mid"]
    if not precise:
        return TMA_CONFIGS["fast"]
    sms = sm_count(device)
    return TMA_CONFIGS["big" if triton.cdiv(m, 256) * triton.cdiv(n, 128) >= sms else "narrow"]


def _tma_mid(m: int, k: int) -> bool:
    return TMA_MID_M is not None and TMA_MID_M[0] < m <= TMA_MID_M[1] and k >= TMA_MID_MIN_K


def _use_tma(a_q, w_q, m: int, block: int, split_k: int | None) -> bool:
    large = TMA_LARGE and m > 512
    if block or not (large or _tma_mid(m, a_q.shape[1])) or (split_k or 1) > 1 or a_q.device.type != "cuda":
        return False
    return cc_major(a_q.device) >= 9 and tma_ok(a_q, w_q)


# Per-channel GEMMs with SCALED_MM_M[0] <= M <= SCALED_MM_M[1] on sm_90+ go to torch._scaled_mm (rowwise
# scales, no fast accumulation) instead of the Triton kernel; None: never. bench/decode_sweep.py --only dense
# compares the two at the decode step's shapes.
SCALED_MM_M: tuple[int, int] | None = None


def _use_scaled_mm(a_q, m: int, n: int, k: int, block: int, out_dtype) -> bool:
    if SCALED_MM_M is None or block or a_q.device.type != "cuda" or out_dtype != torch.bfloat16:
        return False
    return SCALED_MM_M[0] <= m <= SCALED_MM_M[1] and n % 16 == 0 and k % 16 == 0 and cc_major(a_q.device) >= 9


def _auto_split_k(device, m: int, tiles: int, k_blocks: int) -> int:
    """Decode sizes (M <= 64, weight-bound) whose grid leaves SMs idle: split K, >= 4 K blocks each."""
    if device.type != "cuda" or m > 64:
        return 1
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), k_blocks // 4))


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None):
    """shared.model.ops signature: W8A8 per-token x per-channel; x [..., K] -> [..., N] in x.dtype.
    x_fp8: x's per-token FP8 form (q [T, K], scale [T, 1]) when its producer made it (a fused norm)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x_fp8 is None and _gemv_quantizes(x2):  # the GEMV quantizes x2 itself: no quant launch (checks x2's K)
        return _gemv_on_rows(x, x2, w_fp8, w_scale, bias, gemv.A_QUANT)
    xq, xs = x_fp8 if x_fp8 is not None else quant_fp8_per_token(x2.contiguous())
    y = fp8_gemm(xq, xs, w_fp8, w_scale.reshape(-1, 1).float(), bias, x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def rms_norm_fp8_linear(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w_fp8: torch.Tensor,
                        w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """shared.model.ops signature: fp8_linear(rms_norm(x)), x [T, K] 16-bit. With the GEMV quantizing its input
    (fp8_gemv.FUSED_ACT, T <= GEMV_MAX_M, K within one chunk) one launch: each GEMV program normalises its row itself
    (A_NORM); else the norm kernel makes the FP8 form (rms_norm_fp8) and the GEMM takes it, two launches."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    if (_gemv_quantizes(x2) and norm_w.dtype == x.dtype
            and gemv.gemv_config(x.device, m, w_fp8.shape[0], k)[1] >= k):  # the row in one chunk
        return _gemv_on_rows(x, x2, w_fp8, w_scale, bias, gemv.A_NORM, (norm_w, eps))
    y, x_fp8 = rms_norm_fp8(x2, norm_w, eps)
    return fp8_linear(y, w_fp8, w_scale, bias, x_fp8).reshape(*x.shape[:-1], -1)


def _gemv_on_rows(x, x2, w_fp8, w_scale, bias, a_mode: int, norm=None) -> torch.Tensor:
    """The GEMV on x's 16-bit rows x2 [T, K], which it quantizes itself (a_mode, norm: fp8_gemv's) -> [..., N] in
    x.dtype. Rows are taken as they are when their columns are contiguous (a view into a fused GEMM's output: the
    GEMV takes any row stride), else as a contiguous copy."""
    out = new_out((x2.shape[0], w_fp8.shape[0]), x.dtype, x.device)
    rows = x2 if x2.stride(1) == 1 else x2.contiguous()
    fp8_gemv(rows, None, w_fp8, w_scale.reshape(-1, 1).float().contiguous(), bias, out, a_mode=a_mode, norm=norm)
    return out.reshape(*x.shape[:-1], -1)


def _gemv_quantizes(x2: torch.Tensor) -> bool:
    """fp8_linear's rows go to the GEMV as 16-bit rows it quantizes itself (kernels/fp8_gemv.py FUSED_ACT)."""
    return (gemv.FUSED_ACT and x2.dtype in (torch.bfloat16, torch.float16) and 0 < x2.shape[0]
            and _use_gemv(x2.shape[0], 0, x2.device))


def fp8_block_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None):
    """128x128 block-scaled weights (w_scale [cdiv(N,128), cdiv(K,128)]), 1x128 activation groups."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quant_fp8_group(x2.contiguous(), 128)
    y = fp8_gemm(xq, xs, w_fp8, w_scale.float(), bias, x.dtype, block=128)
    return y.reshape(*x.shape[:-1], -1)
