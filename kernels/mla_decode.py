"""MLA decode attention over the latent KV cache (one new token per sequence), Triton on CUDA; every
worker rank of an MLA model (GLM-4.7-Flash). paged_attention_fwd routes single-token MLA batches here.

Layout (shared/kvcache/cache.py): cache [num_slots, 1, DL + DR] = [latent | rope]; V = the latent.
q [B, H, DL + DR] (absorbed query), out [B, H, DL]. The latent is shared by all H heads, so one
program per (sequence, key split) reads each 2*(DL+DR)-byte cache row once and serves every head.
The problem is computed transposed, keys in the M dimension: s^T [BLOCK_N, BLOCK_H] = K q^T and
out^T [DL, BLOCK_H] += K_latent^T p^T, so M is BLOCK_N keys (>= 64: Hopper wgmma) or the 512 latent
dims, and the head count is only padded to the N tile (20 -> 32), not to a 64-row M tile.
Bytes: B * ctx * (DL + DR) * 2 (plus the split partials, [B, H, splits, DL] fp32, merged after).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import INTERPRET, dot_in, dot_precision, new_out, next_pow2, pdl_enter, pdl_kw


@triton.jit
def _load_tile(kv_ptr, page, j, j_ok, page_size, kv_ss, dl, dr, DL, DR):
    """Cache rows of keys j (where j_ok; page = each key's page id): latent [BLOCK_N, BLOCK_DL] and rope
    [BLOCK_N, BLOCK_DR], 0 elsewhere."""
    row = kv_ptr + (page.to(tl.int64) * page_size + j % page_size)[:, None] * kv_ss
    k_lat = tl.load(row + dl[None, :], mask=j_ok[:, None] & (dl[None, :] < DL), other=0.0)
    k_rope = tl.load(row + DL + dr[None, :], mask=j_ok[:, None] & (dr[None, :] < DR), other=0.0)
    return k_lat, k_rope


@triton.jit
def _mla_decode_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr, page_table_ptr, seq_lens_ptr,
    q_st, q_sh, kv_ss, o_st, o_sh, o_ss, pt_stride, scale_log2, page_size, min_keys, H, DL, DR,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DL: tl.constexpr,
    BLOCK_DR: tl.constexpr, UPCAST: tl.constexpr, PREFETCH: tl.constexpr, PREC: tl.constexpr = "tf32",
    PDL: tl.constexpr = False,
):
    """Program (sequence, split): keys [lo, hi) of the sequence, all heads; out (or its split partial
    plus the base-2 log-sum-exp when NUM_SPLITS > 1) for every head. A split holds at least min_keys
    keys, so a short sequence uses few of the NUM_SPLITS (the rest store l = 0: lse -inf, weight 0)."""
    pdl_enter(PDL)
    seq = tl.program_id(0)
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N, min_keys)
    lo = split * per_split
    hi = tl.minimum(seq_len, lo + per_split)
    h = tl.arange(0, BLOCK_H)
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    h_ok = h < H
    q_row = q_ptr + seq.to(tl.int64) * q_st + h[None, :] * q_sh
    q_lat = dot_in(tl.load(q_row + dl[:, None], mask=h_ok[None, :] & (dl[:, None] < DL), other=0.0), UPCAST)
    q_rope = dot_in(tl.load(q_row + DL + dr[:, None], mask=h_ok[None, :] & (dr[:, None] < DR), other=0.0), UPCAST)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DL, BLOCK_H], dtype=tl.float32)  # out^T
    pt = page_table_ptr + seq.to(tl.int64) * pt_stride
    j_next = lo + tl.arange(0, BLOCK_N)
    page_next = tl.load(pt + j_next // page_size, mask=j_next < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        if PREFETCH:  # the next tile's page ids load a step ahead: the tile's own loads wait on nothing
            page = page_next
            page_next = tl.load(pt + (j + BLOCK_N) // page_size, mask=j + BLOCK_N < hi, other=0)
        else:
            page = tl.load(pt + j // page_size, mask=j_ok, other=0)
        k_lat, k_rope = _load_tile(kv_ptr, page, j, j_ok, page_size, kv_ss, dl, dr, DL, DR)
        k_lat, k_rope = dot_in(k_lat, UPCAST), dot_in(k_rope, UPCAST)
        s = tl.dot(k_lat, q_lat, input_precision=PREC) + tl.dot(k_rope, q_rope, input_precision=PREC)  # [BLOCK_N, BLOCK_H] = scores^T
        s = tl.where(j_ok[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(k_lat), p.to(k_lat.dtype), input_precision=PREC)  # [BLOCK_DL, BLOCK_H]
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[None, :]
    o_p = out_ptr + seq.to(tl.int64) * o_st + h[None, :] * o_sh + split * o_ss + dl[:, None]
    # a split without keys (lo >= hi) writes only its lse (-inf): the merge never reads its partial
    dl_end = DL
    if NUM_SPLITS > 1:
        dl_end = tl.where(lo < hi, DL, 0)  # no keys: store nothing
    tl.store(o_p, o.to(out_ptr.dtype.element_ty), mask=h_ok[None, :] & (dl[:, None] < dl_end))
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + (seq.to(tl.int64) * H + h) * NUM_SPLITS + split, lse, mask=h_ok)


# (gpu name) -> (BLOCK_N, num_warps, num_stages, splits; 0 = cdiv(SMs, B)); H100 sweep, KERNEL_NOTES v7.
# `splits` is what batches that fill the SMs use; batches of few sequences (B * splits * 4 <= SMs) get
# up to cdiv(SMs, B) (at most MAX_SPLITS), and each split covers at least MIN_KEYS keys, so the 4 splits tuned at ctx 512 stay what a short
# sequence uses while one 16k-token sequence spreads over 128 SMs instead of 4 (H200: TPOT 30 ms at
# 16k before). Both are decided per sequence on the device: a CUDA graph captured at any length fits.
# BLOCK_N 16 (H100 runs 18 / 19, bench/gpu_results/h100_run18_h100e, us for BLOCK_N 32 / 16 at 4 warps, 3 stages):
# B 1 ctx 640 13.7 / 11.2, B 64 41.4 / 34.6, B 128 67.0 / 56.7, B 64 ctx 4096 165.1 / 144.9, B 1 ctx 16k 33.1 /
# 27.2: a 16-key tile is one MMA row block, so the key reductions stay inside a warp and no warp repeats
# another's score MMAs (the 32-key tile's [32 x 32] scores split over 4 warps did: 144 vs 36 mma.sync a tile).
CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "default": (16, 4, 3, 4),
}
# Batches of at least one sequence per SM: one program per sequence already fills the GPU, so no split
# (no partials to write and merge): H200, B 256 ctx 640: 157 -> 111 us, 104 us with the page ids
# prefetched (bench/decode_sweep.py; bench/gpu_results/h200_run11_sweep, h200_run13_mla). (BLOCK_N,
# num_warps, num_stages). H100 runs 18 / 19 at B 256 ctx 640 (us): BLOCK_N 32 106.3 / 107.0, BLOCK_N 16 105.5 /
# 104.0 (noise); rejected there: a lazy rescale (acc rescaled only when a head's max grows by > 2^8) 109.6, two
# programs per sequence with half the heads each (smaller accumulator, keys shared through L2) 277.5, 8 warps 160.4.
WIDE_CONFIGS: dict[str, tuple[int, int, int]] = {
    "default": (32, 4, 3),
}
_CPU_CONFIG = (16, 4, 1, 0)
# Load each tile's page ids one step ahead, so the tile's loads wait on nothing: H200 with 3 stages, ctx 640
# B 64 43 -> 39 us, B 128 81 -> 74, B 256 111 -> 104; B 64 ctx 4096 182 -> 165; B 1 within 1 us (h200_run13_mla)
PREFETCH_PAGES = True
MAX_SPLITS = 128  # partials: B * H * splits * DL * 4 bytes, written only by splits that hold keys
# Keys a split covers at least. H100 run 15 (bench/mla_splits.py, CUDA graphs, us for min keys 128 / 64 / 32):
# B 1 ctx 640 26.9 / 19.8 / 16.8, B 4 26.0 / 18.9 / 15.6, B 16 27.8 all three, B 256 107.3 / 107.5 / 105.7,
# B 1 ctx 4096 29.0 / 24.0 / 25.7: 32 wins at the serving lengths (512 in + 256 out), 64 by 1.7 us at 4k.
MIN_KEYS = 32


# Hopper warpgroup-MMA kernel (mla_decode_wg.py), on any GPU it supports (sm_90): (min batch, num_warps,
# num_stages); batches of at least `min batch` sequences use it with wg_splits. H100 run 23 (bench/gpu_results/
# h100_run23_mla, us at ctx 640, Triton rule -> wg): B 64 33.7 -> 29.3, B 128 57.5 -> 40.7, B 256 108.2 -> 79.0
# (0.58 -> 0.80 of the copy ceiling), B 64 ctx 4096 141.0 -> 110.7 (0.91), B 1 ctx 16k 27.1 -> 23.8; B 1 ctx
# 640 10.7 -> 10.3 (run 20). 8 warps within 2 % of 4 everywhere.
WG_CONFIGS: dict[str, tuple[int, int, int]] = {"default": (1, 4, 2)}
# Launches of more warpgroup-kernel programs than SMs (B > 132 at one split: B 256 is two waves of one 189 KB program an
# SM) run its one-stage form instead: 112 KB and <= 256 registers a program, so two programs share an SM and one's
# fixed part (q, the first tile's latency, the epilogue: ~6 us of a ~31 us program at ctx 640, H200 run 19) overlaps
# the other's key stream, and B 256 runs as one wave. Same bits. Predicted ~-0.4 ms a step at B 256 (KERNEL_NOTES
# v20); measured (H100 run 42, median graph ms on / off) 18.670 / 18.615: slower, so off. Offline sm_90: 114,944 B of
# shared memory, 255 registers, ~150 B of stack (loop-invariant addresses). False: STAGES 2 everywhere
# (bench/ab_step.py --switch mla_two_per_sm).
WG_TWO_PER_SM = False


def wg_splits(num_seqs: int, sms: int) -> int:
    """Splits per sequence for the warpgroup-MMA kernel: its 189 KB program takes a whole SM, so fill the SMs
    about once, sms // B, and no split once B >= SMs (H100 run 23, us: B 128 ctx 640 one split 40.7, two 57.3;
    B 256 one 79.8, two 107.7; B 64 ctx 4096 two 110.8, one 148.3, four 122.3); MIN_KEYS keeps short
    sequences on few."""
    return max(1, min(sms // max(1, num_seqs), MAX_SPLITS))


def tuned_splits(num_seqs: int, sms: int, fixed: int) -> int:
    """Splits per sequence on a tuned GPU: 1 once the batch fills the SMs (B >= SMs, see WIDE_CONFIGS);
    2 from half the SMs (H200, B 128 ctx 640: 63 us vs 74 with 4 splits, h200_run13_mla); up to
    cdiv(SMs, B) where the tuned `fixed` grid would leave >= 3/4 of the SMs idle (H200: B <= 8; B 16 at
    ctx 512 measured slower with 9 splits than with 4, bench/gpu_results/h200x2_run11_mla); else fixed."""
    if num_seqs >= sms:
        return 1
    if 2 * num_seqs >= sms:
        return min(2, fixed)
    if 4 * num_seqs * fixed <= sms:
        return min(triton.cdiv(sms, max(1, num_seqs)), MAX_SPLITS)
    return fixed


def num_splits(num_seqs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Fill the SMs about once (partials cost 8*H*DL bytes a split, so few splits): cdiv(SMs, B)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(sms, max(1, num_seqs)), triton.cdiv(max_seq_len, 4 * block_n), 16))


def mla_decode(q, cache, page_table, seq_lens, page_size: int, scale: float, max_seq_len: int, dl: int,
               splits: int | None = None, config: tuple[int, int, int, int] | None = None,
               min_keys: int | None = None, prefetch: bool | None = None,
               wg: tuple[int, int] | None = None) -> torch.Tensor:
    """q [B, H, DL + DR], cache [slots, 1, DL + DR] (row stride any, last dim contiguous) -> [B, H, DL].
    wg (num_warps, num_stages): the Hopper warpgroup-MMA kernel (default: WG_CONFIGS' rule for this GPU).
    Caller (paged_attention_fwd) has checked dtypes, strides and metadata shapes."""
    from glmserve.kernels import mla_decode_wg
    from glmserve.kernels._common import gpu_name, sm_count
    from glmserve.kernels.paged_attention import _merge_kernel

    b, h, dk = q.shape
    name = gpu_name(q.device)
    rule = WG_CONFIGS.get(name, WG_CONFIGS.get("default"))
    if wg is None and config is None and rule is not None and b >= rule[0]:
        wg = rule[1:]
    wg = wg if wg is not None and mla_decode_wg.supported(q, cache) else None
    block_n, warps, stages, fixed = config or (_CPU_CONFIG if name == "cpu" else CONFIGS.get(name, CONFIGS["default"]))
    if wg is not None:
        block_n = mla_decode_wg.BLOCK_N
    if splits is None and fixed:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        splits = wg_splits(b, sms) if wg is not None else tuned_splits(b, sms, fixed)
        if b >= sms and config is None and wg is None:
            block_n, warps, stages = WIDE_CONFIGS.get(name, WIDE_CONFIGS["default"])
    n_split = splits or num_splits(b, max_seq_len, block_n, q.device)
    if wg is not None and WG_TWO_PER_SM and b * n_split > sm_count(q.device):
        wg = (wg[0], 1)  # one stage: two programs an SM
    min_keys = (MIN_KEYS if q.is_cuda else 0) if min_keys is None else min_keys
    out = new_out((b, h, dl), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    part = out if n_split == 1 else new_out((b, h, n_split, dl), dtype=torch.float32, device=q.device)
    lse = part if n_split == 1 else new_out((b, h, n_split), dtype=torch.float32, device=q.device)
    strides = (out.stride(0), out.stride(1), 0) if n_split == 1 else (h * n_split * dl, n_split * dl, dl)
    if wg is not None:
        mla_decode_wg.launch(q, cache, part, lse, page_table, seq_lens, strides, page_size, scale, min_keys, dl,
                             n_split, warps=wg[0], stages=wg[1])
    else:
        _mla_decode_kernel[(b, n_split)](
            q, cache, part, lse, page_table, seq_lens, q.stride(0), q.stride(1), cache.stride(0), *strides,
            page_table.stride(0), scale * 1.4426950408889634, page_size, min_keys, h, dl, dk - dl,
            NUM_SPLITS=n_split, BLOCK_H=max(16, next_pow2(h)), BLOCK_N=block_n, BLOCK_DL=max(16, next_pow2(dl)),
            BLOCK_DR=max(16, next_pow2(dk - dl)), UPCAST=INTERPRET, PREFETCH=PREFETCH_PAGES if prefetch is None else prefetch,
            PREC=dot_precision(q.dtype),
            num_warps=warps, num_stages=stages, **pdl_kw(q.device, b),
        )
    if n_split > 1:
        _merge_kernel[(b * h,)](
            part, lse, out, dl, out.stride(0), out.stride(1), NUM_HEADS=h, NUM_SPLITS=n_split,
            BLOCK_S=next_pow2(n_split), BLOCK_DV=max(16, next_pow2(dl)), num_warps=4, **pdl_kw(out.device, b),
        )
    return out
