"""MLA decode attention on Hopper warpgroup MMA (Gluon), for the batches where the Triton kernel
(mla_decode.py) is bound by shared-memory reads rather than HBM (KERNEL_NOTES v8: its mma.sync path
re-reads q and every warp re-reads the whole key tile as a register operand, ~108 KB of ldmatrix per
16 keys). Same contract as mla_decode._mla_decode_kernel, which stays the reference and the path on
every other GPU: program (sequence, split) covers keys [lo, hi) for all heads.

Layout: q [B, H, DL + DR] (absorbed query), cache [slots, 1, DL + DR] = [latent | rope], V = latent.
Per tile of BLOCK_N = 64 keys (the wgmma M minimum), both products read their operands from shared memory:
  s^T [64, BH]  = K_lat [64, DL] . q_lat^T [DL, BH] + K_rope [64, DR] . q_rope^T [DR, BH]
  out^T [DL, BH] += K_lat^T [DL, 64] . p^T [64, BH]      (A: the same key tile, a transposed view)
BH = the head count padded to 32 (the MMA N). The key rows are gathered through the page table by
cp.async into a STAGES-deep ring; q and p are written to shared memory once per program / per tile.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

# cp.async global -> shared: async_copy_global_to_shared in triton 3.6 (the GPU image), async_load from 3.7 on
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # CTA-wide bar.sync: renamed in 3.7

BLOCK_N = 64  # keys a tile: the wgmma M
# q into shared memory by cp.async, in the first tile's commit group, instead of through registers before the
# first key copy is issued. H200 run 19: a program pays ~6 us besides ~2.5 us a 64-key tile (B 256 ctx 640
# 62.7 us for 2 waves of 10-tile programs, B 64 ctx 4096 86.8 us for one wave of 32), so the prologue is a
# tenth of the kernel at ctx 640. H100 run 35 (bench/ab_step.py --switch mla_q_async, FP8 GLM-4.7-Flash step, ctx
# 640, median graph ms on / off): B 1 3.779 / 3.843, B 64 14.798 / 14.875, B 256 18.565 / 18.794 (and 18.692 /
# 18.754 in a second process), logits bit-equal. False: q through registers (the reference schedule).
Q_ASYNC = True
# One-split launches (B >= SMs / 2 on the wg path): the first STAGES tiles' page ids load beside seq_len rather than
# after it (their rows are [0, STAGES * 64) whatever the length; masked by the page table's width, not by hi), so the
# first key copy waits one global round trip, not two. Same tiles, same order: bit-equal output (GPU test). Predicted
# ~-0.03 ms at B 64, ~-0.05 at B 256; H100 run 40 (bench/ab_step.py --switch mla_early_pages, FP8 GLM-4.7-Flash step,
# ctx 640, median graph ms on / off): B 64 14.854 / 15.025, B 256 18.834 / 18.957, logits bit-equal.
EARLY_PAGES = True


@gluon.jit
def _tile_pages(pt, start, hi, page_size, LD: gl.constexpr):
    """Page id of each key in [start, start + BLOCK_N) (0 past hi): [64], rows of LD."""
    j = start + gl.arange(0, 64, layout=gl.SliceLayout(1, LD))
    return gl.load(pt + j // page_size, mask=j < hi, other=0)


@gluon.jit
def _tile_pages_early(pt, start, pt_cols, page_size, LD: gl.constexpr):
    """_tile_pages without the length: page-table entries [start, start + BLOCK_N) // page_size that exist in
    the row (pt_cols of them; 0 past it). Entries past the sequence's pages may hold anything: their keys are
    never copied (_issue_tile masks by hi) nor scored."""
    j = start + gl.arange(0, 64, layout=gl.SliceLayout(1, LD))
    return gl.load(pt + j // page_size, mask=j // page_size < pt_cols, other=0)


@gluon.jit
def _issue_tile(kl_s, kr_s, kv_ptr, page, start, hi, page_size, kv_ss,
                DL: gl.constexpr, DR: gl.constexpr, LD: gl.constexpr):
    """cp.async of keys [start, start + BLOCK_N) (rows >= hi zero-filled; page = their page ids, _tile_pages)
    into kl_s [64, DL], kr_s [64, DR], one commit group."""
    j = start + gl.arange(0, 64, layout=gl.SliceLayout(1, LD))
    j_ok = j < hi
    row = kv_ptr + (page.to(gl.int64) * page_size + j % page_size)[:, None] * kv_ss
    c = gl.arange(0, 64, layout=gl.SliceLayout(0, LD))[None, :]
    for i in gl.static_range(DL // 64):
        _cp_async(kl_s.slice(i * 64, 64, dim=1), row + (i * 64 + c), mask=j_ok[:, None])
    _cp_async(kr_s, row + (DL + c), mask=j_ok[:, None])
    async_copy.commit_group()


@gluon.jit
def _mla_decode_wg_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr, page_table_ptr, seq_lens_ptr,
    q_st, q_sh, kv_ss, o_st, o_sh, o_ss, pt_stride, pt_cols, scale_log2, page_size, min_keys, H,
    NUM_SPLITS: gl.constexpr, BH: gl.constexpr, DL: gl.constexpr, DR: gl.constexpr, STAGES: gl.constexpr,
    Q_ASYNC: gl.constexpr, num_warps: gl.constexpr, EARLY_PAGES: gl.constexpr = False,
):
    """Program (sequence, split): keys [lo, hi) of the sequence (the split rule of mla_decode), every head;
    out (or its fp32 split partial plus the base-2 log-sum-exp when NUM_SPLITS > 1). STAGES 1: one key buffer, each
    tile's copies issued once the previous tile's MMAs are done (112 KB of shared memory: two programs an SM, one
    program's copies in flight while the other computes; see mla_decode.WG_TWO_PER_SM); same tiles in the same
    order, so the same bits as STAGES 2."""
    gl.static_assert(DR == 64, "the rope part is one 64-column copy chunk")
    gl.static_assert(DL % 64 == 0)
    # registers: s^T [64, BH] (warps split keys, then heads); out^T [DL, BH] (warps split the latent dims)
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                  instr_shape=[16, BH // (num_warps // 4), 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BH, 16])
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte vectors, 128 B a row
    KL_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DL], gl.bfloat16)
    KR_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DR], gl.bfloat16)
    QL_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, DL], gl.bfloat16)
    QR_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, DR], gl.bfloat16)
    P_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BH], gl.bfloat16)

    seq = gl.program_id(0)
    split = gl.program_id(1)
    seq_len = gl.load(seq_lens_ptr + seq)
    per_split = gl.maximum(gl.cdiv(gl.cdiv(seq_len, NUM_SPLITS), 64) * 64, min_keys)
    lo = split * per_split
    hi = gl.minimum(seq_len, lo + per_split)
    n_tiles = gl.cdiv(gl.maximum(hi - lo, 0), 64)

    # q -> shared memory once: [BH, DL] and [BH, DR], heads >= H zero (their scores are 0, never stored)
    hq = gl.arange(0, BH, layout=gl.SliceLayout(1, LD))
    q_row = q_ptr + seq.to(gl.int64) * q_st + hq[:, None] * q_sh
    c = gl.arange(0, 64, layout=gl.SliceLayout(0, LD))[None, :]
    ql_s = gl.allocate_shared_memory(gl.bfloat16, [BH, DL], QL_SL)
    qr_s = gl.allocate_shared_memory(gl.bfloat16, [BH, DR], QR_SL)
    kl_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 64, DL], KL_SL)
    kr_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 64, DR], KR_SL)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [64, BH], P_SL)
    if Q_ASYNC:  # by cp.async in tile 0's commit group: its latency overlaps the first tiles' copies
        for i in gl.static_range(DL // 64):
            _cp_async(ql_s.slice(i * 64, 64, dim=1), q_row + (i * 64 + c), mask=hq[:, None] < H)
        _cp_async(qr_s, q_row + (DL + c), mask=hq[:, None] < H)
    else:  # through registers, before any key copy is issued
        for i in gl.static_range(DL // 64):
            ql_s.slice(i * 64, 64, dim=1).store(gl.load(q_row + (i * 64 + c), mask=hq[:, None] < H, other=0.0))
        qr_s.store(gl.load(q_row + (DL + c), mask=hq[:, None] < H, other=0.0))

    pt = page_table_ptr + seq.to(gl.int64) * pt_stride
    if EARLY_PAGES and NUM_SPLITS == 1:  # lo = 0: the first tiles' page ids do not wait on seq_len's load
        gl.static_assert(STAGES == 2, "early pages: the one prologue tile and page_next")
        page_0 = _tile_pages_early(pt, 0, pt_cols, page_size, LD)
        page_next = _tile_pages_early(pt, 64, pt_cols, page_size, LD)
        _issue_tile(kl_s.index(0), kr_s.index(0), kv_ptr, page_0, 0, hi, page_size, kv_ss, DL, DR, LD)
    else:
        for t in gl.static_range(STAGES - 1):  # prologue: tiles 0 .. STAGES-2 in flight (empty tiles zero-fill;
            # one stage: none, the loop issues every tile)
            _issue_tile(kl_s.index(t), kr_s.index(t), kv_ptr, _tile_pages(pt, lo + t * 64, hi, page_size, LD),
                        lo + t * 64, hi, page_size, kv_ss, DL, DR, LD)
        # page ids load a tile ahead of their copies: the issue never waits on the page table
        page_next = _tile_pages(pt, lo + (STAGES - 1) * 64, hi, page_size, LD)

    m_i = gl.full([BH], -1.0e30, gl.float32, layout=gl.SliceLayout(0, S_L))
    l_i = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(0, S_L))
    acc = gl.zeros([DL, BH], gl.float32, layout=O_L)  # out^T
    j0 = gl.arange(0, 64, layout=gl.SliceLayout(1, S_L))
    for t in range(n_tiles):
        if STAGES == 1:  # one buffer: tile t's copies go out once every warp's MMAs have read tile t - 1
            _barrier()
            _issue_tile(kl_s.index(0), kr_s.index(0), kv_ptr, page_next, lo + t * 64, hi, page_size, kv_ss, DL, DR,
                        LD)
            page_next = _tile_pages(pt, lo + (t + 1) * 64, hi, page_size, LD)
        st = t % STAGES
        async_copy.wait_group(max(STAGES - 2, 0))  # this thread's copies of tile t have landed
        fence_async_shared()  # ... are visible to the wgmma (async proxy)
        _barrier()  # ... as are every thread's; and every warp is done with tile t-1's buffers
        if STAGES > 1:  # the next tile's copies go out now, into the stage tile t-1 used
            nxt = t + STAGES - 1
            _issue_tile(kl_s.index(nxt % STAGES), kr_s.index(nxt % STAGES), kv_ptr, page_next, lo + nxt * 64, hi,
                        page_size, kv_ss, DL, DR, LD)
            page_next = _tile_pages(pt, lo + (nxt + 1) * 64, hi, page_size, LD)
        kl = kl_s.index(st)
        s = warpgroup_mma(kl, ql_s.permute((1, 0)), gl.zeros([64, BH], gl.float32, layout=S_L),
                          use_acc=False, is_async=True)
        s = warpgroup_mma(kr_s.index(st), qr_s.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        j_ok = lo + t * 64 + j0 < hi
        s = gl.where(j_ok[:, None], s * scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        p = gl.exp2(s - m_new[None, :])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=0)
        m_i = m_new
        p_s.store(p.to(gl.bfloat16))
        fence_async_shared()
        _barrier()
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_L))[None, :]
        acc = warpgroup_mma(kl.permute((1, 0)), p_s, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    if STAGES == 1:  # no tile (no keys): q's copies (Q_ASYNC) are in no commit group yet
        async_copy.commit_group()
    async_copy.wait_group(0)  # no copy outlives the program's shared memory

    safe_l = gl.where(l_i > 0, l_i, 1.0)
    o = acc / gl.convert_layout(safe_l, gl.SliceLayout(0, O_L))[None, :]
    h = gl.arange(0, BH, layout=gl.SliceLayout(0, O_L))
    dl = gl.arange(0, DL, layout=gl.SliceLayout(1, O_L))
    o_p = out_ptr + seq.to(gl.int64) * o_st + h[None, :] * o_sh + split * o_ss + dl[:, None]
    dl_end = DL
    if NUM_SPLITS > 1:
        dl_end = gl.where(lo < hi, DL, 0)  # no keys: the partial is never read (its lse is -inf)
    gl.store(o_p, o.to(out_ptr.dtype.element_ty), mask=(h[None, :] < H) & (dl[:, None] < dl_end))
    if NUM_SPLITS > 1:
        lse = gl.where(l_i > 0, m_i + gl.log2(safe_l), float("-inf"))
        hs = gl.arange(0, BH, layout=gl.SliceLayout(0, S_L))
        gl.store(lse_ptr + (seq.to(gl.int64) * H + hs) * NUM_SPLITS + split, lse, mask=hs < H)


def supported(q, cache) -> bool:
    """The shapes and GPUs this kernel is built for: Hopper, bf16, latent 512-multiple of 64, rope 64,
    at most 32 heads."""
    import torch

    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    b, h, dk = q.shape
    dl = dk - 64
    return q.dtype == cache.dtype == torch.bfloat16 and h <= 32 and dl % 64 == 0 and dl > 0


def launch(q, cache, part, lse, page_table, seq_lens, strides, page_size: int, scale: float, min_keys: int,
           dl: int, n_split: int, stages: int = 2, warps: int = 4) -> None:
    """Same arguments as mla_decode's Triton launch; writes part (out, or the fp32 partials) and lse."""
    b, h, dk = q.shape
    _mla_decode_wg_kernel[(b, n_split)](
        q, cache, part, lse, page_table, seq_lens, q.stride(0), q.stride(1), cache.stride(0), *strides,
        page_table.stride(0), page_table.shape[1], scale * 1.4426950408889634, page_size, min_keys, h,
        NUM_SPLITS=n_split, BH=32, DL=dl, DR=dk - dl, STAGES=stages, Q_ASYNC=Q_ASYNC, num_warps=warps,
        EARLY_PAGES=EARLY_PAGES and stages == 2,
    )

