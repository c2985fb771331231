"""Paged causal attention over the KV cache, prefill (varlen, chunked) and decode, GQA and MLA.
Triton on CUDA, torch reference in shared.model.ops / below; every worker rank.

Inputs (shared/kvcache/cache.py layout, shared/runner/batch.py metadata):
  q        [T, Hq, Dk]          new tokens' queries (T = sum query_lens)
  k_cache  [num_slots, Hkv, Dk] slot = page_id * page_size + offset (the new tokens already written)
  v_cache  [num_slots, Hkv, Dv] GQA: the V part; MLA: a view of k_cache's first Dv dims (latent)
  page_table [B, max_pages] int32, seq_lens [B], query_start_loc [B+1]
Query row j of sequence i sits at position seq_len_i - query_len_i + j and sees keys 0..that position.

One program owns BLOCK_M rows = (token, head) pairs of one sequence and one KV head (the G = Hq / Hkv
query heads sharing a KV head are packed into the M dimension, so decode's single token still fills a
tensor-core tile), and one of NUM_SPLITS slices of the keys (split-K for long decode contexts; a second
kernel merges the slices by their log-sum-exp). Dk is cut into part A = the first DA dims and part B
= the rest (MLA: A = the 512 latent dims, B = the 64 rope dims), both padded to powers of two.
Bytes (decode): the KV pages are read once per KV head; q and out are small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels._common import new_out, INTERPRET, check, dot_in, dot_precision, next_pow2, pdl_enter, pdl_kw

MERGE_CHUNK = tl.constexpr(8)  # splits summed at once by _merge_kernel


def paged_attention_ref(q, k_cache, v_cache, batch, page_size: int, scale: float) -> torch.Tensor:
    """Plain torch, per sequence: gather the sequence's slots, causal softmax in fp32."""
    num_heads, num_kv = q.shape[1], k_cache.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v_cache.shape[-1])
    start = 0
    for i, (q_len, prefix_len) in enumerate(zip(batch.query_lens_cpu, batch.prefix_lens_cpu)):
        end, seq_len = start + q_len, prefix_len + q_len
        pos = torch.arange(seq_len, device=q.device)
        slots = batch.page_table[i, pos // page_size].long() * page_size + pos % page_size
        k = k_cache[slots].float().repeat_interleave(num_heads // num_kv, dim=1)  # [S, Hq, Dk]
        v = v_cache[slots].float().repeat_interleave(num_heads // num_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        start = end
    return out


@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, page_table_ptr, seq_lens_ptr, qsl_ptr,
    q_st, q_sh, k_ss, k_sh, v_ss, v_sh, o_st, o_sh, o_ss, pt_stride, scale_log2, page_size, DA, DB, DV,
    G: tl.constexpr, NUM_KV: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_B: tl.constexpr, V_FROM_K: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr = "tf32", PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    seq = tl.program_id(1) // NUM_KV
    kvh = tl.program_id(1) % NUM_KV
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M >= q_len * G:
        return
    tok = rows // G  # [BLOCK_M] token index inside the sequence's new tokens
    head = kvh * G + rows % G
    row_ok = tok < q_len
    pos = seq_len - q_len + tok  # absolute position of each row's token
    kv_end = tl.minimum(seq_len, seq_len - q_len + (tl.program_id(0) * BLOCK_M + BLOCK_M - 1) // G + 1)
    per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(kv_end, lo + per_split)

    da = tl.arange(0, BLOCK_DA)
    q_row = q_ptr + (q_start + tok).to(tl.int64)[:, None] * q_st + head[:, None] * q_sh
    qa = dot_in(tl.load(q_row + da[None, :], mask=row_ok[:, None] & (da[None, :] < DA), other=0.0), UPCAST)
    if HAS_B:
        db = tl.arange(0, BLOCK_DB)
        qb = dot_in(tl.load(q_row + DA + db[None, :], mask=row_ok[:, None] & (db[None, :] < DB), other=0.0), UPCAST)
    dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        page = tl.load(page_table_ptr + seq.to(tl.int64) * pt_stride + j // page_size, mask=j_ok, other=0)
        slot = page.to(tl.int64) * page_size + j % page_size
        k_row = k_ptr + slot[:, None] * k_ss + kvh * k_sh
        ka = dot_in(tl.load(k_row + da[None, :], mask=j_ok[:, None] & (da[None, :] < DA), other=0.0), UPCAST)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if HAS_B:
            kb = dot_in(tl.load(k_row + DA + db[None, :], mask=j_ok[:, None] & (db[None, :] < DB), other=0.0), UPCAST)
            s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        ok = j_ok[None, :] & (j[None, :] <= pos[:, None])
        s = tl.where(ok, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_FROM_K:
            v = ka  # MLA: V is the latent = K part A (BLOCK_DV == BLOCK_DA)
        else:
            v = tl.load(v_ptr + slot[:, None] * v_ss + kvh * v_sh + dv[None, :],
                        mask=j_ok[:, None] & (dv[None, :] < DV), other=0.0)
            v = dot_in(v, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    o_row = (q_start + tok).to(tl.int64)[:, None] * o_st + head[:, None] * o_sh + split * o_ss
    tl.store(out_ptr + o_row + dv[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))  # base-2 log-sum-exp
        tl.store(lse_ptr + ((q_start + tok).to(tl.int64) * (NUM_KV * G) + head) * NUM_SPLITS + split, lse, mask=row_ok)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, DV, o_st, o_sh, NUM_HEADS: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, h] = sum_s 2^(lse_s - lse) * part[t, h, s] with lse = log2 sum_s 2^lse_s. A split with
    lse -inf (no keys) weighs 0 and its partial is never read (it may be unwritten). The partials
    are summed MERGE_CHUNK splits at a time: [MERGE_CHUNK, BLOCK_DV] fp32 in registers, any split count,
    up to the last split with keys (MLA decode at B 1: 20 of 128 splits hold keys at ctx 640; the walk over
    all 128 cost 6.4 us a layer on an H100, run 16)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)  # t * NUM_HEADS + h
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.maximum(tl.max(lse, axis=0), -1.0e30)
    total = tl.maximum(tl.sum(tl.exp2(lse - m), axis=0), 1e-30)
    live_end = tl.max(tl.where(lse > float("-inf"), s + 1, 0), axis=0)  # splits past the last live one: skipped
    o = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for c in range(0, live_end, MERGE_CHUNK):
        sc = c + tl.arange(0, MERGE_CHUNK)
        lse_c = tl.load(lse_ptr + row * NUM_SPLITS + sc, mask=sc < NUM_SPLITS, other=float("-inf"))
        live = (sc < NUM_SPLITS) & (lse_c > float("-inf"))
        part = tl.load(part_ptr + (row * NUM_SPLITS + sc[:, None]) * DV + dv[None, :],
                       mask=live[:, None] & (dv[None, :] < DV), other=0.0)
        o += tl.sum(part * (tl.exp2(lse_c - m) / total)[:, None], axis=0)
    t, h = row // NUM_HEADS, row % NUM_HEADS
    tl.store(out_ptr + t * o_st + h * o_sh + dv, o.to(out_ptr.dtype.element_ty), mask=dv < DV)


# Launch configs as data: (gpu name, "gqa" | "mla", "decode" | "prefill") -> (BLOCK_M, BLOCK_N, num_warps,
# num_stages). Decode packs the G heads of one KV head into BLOCK_M; prefill wants taller M tiles.
# Untuned starting points (bench/KERNEL_NOTES.md).
CONFIGS: dict[tuple[str, str, str], tuple[int, int, int, int]] = {
    ("default", "gqa", "decode"): (16, 64, 4, 2),
    ("default", "gqa", "prefill"): (64, 64, 4, 2),
    # "gqa_wide": GQA layouts with Dk or Dv > 128 (MLA's expanded prefill: 256 / 256). The gqa tiles
    # spill there (255 regs + stack at sm_90); 8 warps keep the 64 x 256 fp32 accumulator in registers.
    ("default", "gqa_wide", "decode"): (16, 32, 4, 2),
    ("default", "gqa_wide", "prefill"): (64, 64, 8, 2),
    ("default", "mla", "decode"): (32, 32, 8, 2),
    ("default", "mla", "prefill"): (32, 32, 8, 2),
}
_CPU_CONFIG = (16, 16, 4, 1)


# Single-token MLA batches go to kernels/mla_decode.py (False: this generic kernel, for comparison).
MLA_DECODE_KERNEL = True


def _config(device: torch.device, kind: str, phase: str) -> tuple[int, int, int, int]:
    from glmserve.kernels._common import gpu_name

    name = gpu_name(device)
    if name == "cpu":
        return _CPU_CONFIG
    return CONFIGS.get((name, kind, phase), CONFIGS[("default", kind, phase)])


def _num_splits(max_q_len: int, max_seq_len: int, programs: int, block_n: int, device) -> int:
    """Split the keys only for decode-like batches whose grid would not fill the GPU."""
    if max_q_len > 4 or device.type != "cuda":
        return 1 if device.type == "cuda" else (2 if max_seq_len > 2 * block_n else 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, programs))
    return max(1, min(want, triton.cdiv(max_seq_len, 4 * block_n), 16))


def _check_inputs(q, k_cache, v_cache, page_table, seq_lens, query_start_loc) -> None:
    dk = q.shape[2]
    check(q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "last dims must be contiguous")
    check(k_cache.dim() == 3 and k_cache.shape[2] == dk and v_cache.shape[:2] == k_cache.shape[:2], "cache shapes")
    check(q.shape[1] % k_cache.shape[1] == 0, "Hq must be a multiple of Hkv")
    check(page_table.dtype == torch.int32 and page_table.stride(1) == 1, "page_table must be int32 rows")
    check(q.dtype == k_cache.dtype == v_cache.dtype, "q and cache dtypes must match")
    num_seqs = page_table.shape[0]
    check(seq_lens.shape == (num_seqs,) and query_start_loc.shape == (num_seqs + 1,), "metadata shapes")


def paged_attention_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, page_size: int, scale: float,
    max_q_len: int, max_seq_len: int, num_splits: int | None = None,
) -> torch.Tensor:
    """Launcher; see the module docstring for shapes. max_q_len / max_seq_len are host ints (no sync)."""
    _check_inputs(q, k_cache, v_cache, page_table, seq_lens, query_start_loc)
    t, hq, dk = q.shape
    num_kv, dv = k_cache.shape[1], v_cache.shape[2]
    num_seqs = page_table.shape[0]
    g = hq // num_kv
    v_from_k = v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and dv < dk
    da = dv if dk > dv else dk  # MLA: part A = latent dims shared with V
    kind = "mla" if dk > dv else "gqa"
    if kind == "mla" and v_from_k and num_kv == 1 and max_q_len == 1 and t == num_seqs and MLA_DECODE_KERNEL:
        from glmserve.kernels.mla_decode import mla_decode  # one token per sequence: the latent-once kernel

        return mla_decode(q, k_cache, page_table, seq_lens, page_size, scale, max_seq_len, dv, num_splits)
    tiles = "gqa_wide" if kind == "gqa" and max(dk, dv) > 128 else kind
    block_m, block_n, warps, stages = _config(q.device, tiles, "decode" if max_q_len <= 4 else "prefill")
    if max_q_len == 1:
        block_m = max(block_m, min(64, next_pow2(g)))
    out = new_out((t, hq, dv), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    m_blocks = triton.cdiv(max_q_len * g, block_m)
    splits = num_splits or _num_splits(max_q_len, max_seq_len, m_blocks * num_seqs * num_kv, block_n, q.device)
    part = out if splits == 1 else new_out((t, hq, splits, dv), dtype=torch.float32, device=q.device)
    lse = new_out((t, hq, splits), dtype=torch.float32, device=q.device) if splits > 1 else part
    o_st, o_sh, o_ss = (out.stride(0), out.stride(1), 0) if splits == 1 else (hq * splits * dv, splits * dv, dv)
    block_da = max(16, next_pow2(da))
    _attn_kernel[(m_blocks, num_seqs * num_kv, splits)](
        q, k_cache, v_cache, part, lse, page_table, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o_st, o_sh, o_ss, page_table.stride(0), scale * 1.4426950408889634, page_size, da, dk - da, dv,
        G=g, NUM_KV=num_kv, NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DA=block_da,
        BLOCK_DB=max(16, next_pow2(dk - da)), BLOCK_DV=block_da if v_from_k else max(16, next_pow2(dv)),
        HAS_B=dk > da, V_FROM_K=v_from_k, UPCAST=INTERPRET, PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        **pdl_kw(q.device, t),
    )
    if splits > 1:
        _merge_kernel[(t * hq,)](
            part, lse, out, dv, out.stride(0), out.stride(1), NUM_HEADS=hq, NUM_SPLITS=splits,
            BLOCK_S=next_pow2(splits), BLOCK_DV=max(16, next_pow2(dv)), num_warps=4, **pdl_kw(out.device, t),
        )
    return out


def paged_attention(q, k_cache, v_cache, batch, page_size: int, scale: float) -> torch.Tensor:
    """shared.model.ops signature: batch is a ForwardBatch (its host copies give the grid sizes)."""
    max_q = max(batch.query_lens_cpu, default=0)
    max_seq = max((a + b for a, b in zip(batch.query_lens_cpu, batch.prefix_lens_cpu)), default=0)
    return paged_attention_fwd(
        q, k_cache, v_cache, batch.page_table, batch.seq_lens.to(torch.int32), batch.query_start_loc,
        page_size, scale, max_q, max_seq,
    )
