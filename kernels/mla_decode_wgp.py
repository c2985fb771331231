"""Persistent form of the warpgroup-MMA MLA decode kernel (mla_decode_wg.py, which stays the reference):
one program an SM walks work items (sequence, split) = pid, pid + G, ... and its key-tile ring runs across
item boundaries, so the next item's first tile (and its q) is in flight while the current item's last tile
is computed and its output stored.

Why: the 189 KB program takes a whole SM, and H200 run 19 puts a program at ~6.2 us plus ~2.5 us a 64-key
tile; at B 256 ctx 640 (two waves of 10-tile programs) the fixed part is paid twice an SM. A program here pays
it once. With items <= SMs it is the same work as one wave of the reference kernel.

Invariants (STAGES = 2: one tile in flight while one is computed):
- Every compute step issues exactly one commit group (the next tile of the issue cursor; a zero-filled empty
  group once this program's items are exhausted), so wait_group(0) at the top of step g waits for tile g only.
- q of the n-th item with keys (its ordinal, counted alike by the issue and compute sides) goes to q buffer
  n % 2, in the commit group of that item's tile 0. It is issued during the step before, which computes the
  previous item with keys (ordinal n - 1, the other buffer); buffer n % 2 was last read by ordinal n - 2, whose
  MMAs were all waited before that step's bar.sync.
- Items without keys (an empty split) get no tile and no q buffer; their epilogue stores lse = -inf only.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from glmserve.kernels.mla_decode_wg import _barrier, _cp_async, _issue_tile, _tile_pages

# On: mla_decode_wg.launch runs this kernel when there are more work items than SMs (else one wave of the
# reference kernel is the same schedule). Off until measured (bench/ab_step.py --switch mla_persistent).
ENABLED = False


@gluon.jit
def _item(seq_lens_ptr, item, n_items, min_keys, NUM_SPLITS: gl.constexpr):
    """Work item -> (sequence, first key, end key); past n_items an empty item of sequence 0."""
    ok = item < n_items
    seq = gl.where(ok, item // NUM_SPLITS, 0)
    seq_len = gl.where(ok, gl.load(seq_lens_ptr + seq), 0)
    per_split = gl.maximum(gl.cdiv(gl.cdiv(seq_len, NUM_SPLITS), 64) * 64, min_keys)
    lo = (item % NUM_SPLITS) * per_split
    hi = gl.maximum(gl.minimum(seq_len, lo + per_split), lo)
    return seq, lo, hi


@gluon.jit
def _advance(seq_lens_ptr, item, t, lo, hi, ordinal, n_items, min_keys, G, NUM_SPLITS: gl.constexpr):
    """A cursor (item, tile t of its keys [lo, hi), ordinal of items with keys) -> the next tile of this
    program's items (stride G), skipping items without keys; exhausted: item >= n_items, lo == hi."""
    t += 1
    while (t >= gl.cdiv(hi - lo, 64)) & (item < n_items):
        item += G
        _, lo, hi = _item(seq_lens_ptr, item, n_items, min_keys, NUM_SPLITS)
        t = 0
        ordinal += (hi > lo).to(gl.int32)
    return item, t, lo, hi, ordinal


@gluon.jit
def _issue_q(ql_s, qr_s, q_ptr, seq, q_st, q_sh, H, DL: gl.constexpr, LD: gl.constexpr, BH: gl.constexpr):
    """cp.async of q [H, DL + DR] of `seq` into ql_s [BH, DL], qr_s [BH, DR] (heads >= H zero); no commit."""
    hq = gl.arange(0, BH, layout=gl.SliceLayout(1, LD))
    q_row = q_ptr + seq.to(gl.int64) * q_st + hq[:, None] * q_sh
    c = gl.arange(0, 64, layout=gl.SliceLayout(0, LD))[None, :]
    for i in gl.static_range(DL // 64):
        _cp_async(ql_s.slice(i * 64, 64, dim=1), q_row + (i * 64 + c), mask=hq[:, None] < H)
    _cp_async(qr_s, q_row + (DL + c), mask=hq[:, None] < H)


@gluon.jit
def _issue_next(ql_s, qr_s, kl_s, kr_s, q_ptr, kv_ptr, page_table_ptr, item, t, lo, hi, ordinal, page,
                LOAD_PAGES: gl.constexpr, q_st, q_sh, kv_ss, pt_stride, page_size, H, NUM_SPLITS: gl.constexpr,
                BH: gl.constexpr, DL: gl.constexpr, DR: gl.constexpr, LD: gl.constexpr):
    """One commit group: the cursor's tile into kl_s / kr_s and, at an item's tile 0, its q into q buffer
    ordinal % 2. page: the tile's page ids (LOAD_PAGES: load them here). Returns the page ids used."""
    seq = item // NUM_SPLITS  # past n_items: lo == hi, so every load and copy below is masked off
    start = lo + t * 64
    if LOAD_PAGES:
        page = _tile_pages(page_table_ptr + seq.to(gl.int64) * pt_stride, start, hi, page_size, LD)
    if (t == 0) & (hi > lo):
        _issue_q(ql_s.index(ordinal % 2), qr_s.index(ordinal % 2), q_ptr, seq, q_st, q_sh, H, DL, LD, BH)
    _issue_tile(kl_s, kr_s, kv_ptr, page, start, hi, page_size, kv_ss, DL, DR, LD)
    return page


@gluon.jit
def _mla_decode_wgp_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr, page_table_ptr, seq_lens_ptr,
    q_st, q_sh, kv_ss, o_st, o_sh, o_ss, pt_stride, scale_log2, page_size, min_keys, H, n_items,
    NUM_SPLITS: gl.constexpr, BH: gl.constexpr, DL: gl.constexpr, DR: gl.constexpr, num_warps: gl.constexpr,
):
    """Program p of G: items p, p + G, ... (item = sequence * NUM_SPLITS + split), each as the reference
    kernel's program (sequence, split)."""
    gl.static_assert(DR == 64, "the rope part is one 64-column copy chunk")
    gl.static_assert(DL % 64 == 0)
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                  instr_shape=[16, BH // (num_warps // 4), 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BH, 16])
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    KL_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DL], gl.bfloat16)
    KR_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, DR], gl.bfloat16)
    QL_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, DL], gl.bfloat16)
    QR_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BH, DR], gl.bfloat16)
    P_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BH], gl.bfloat16)
    ql_s = gl.allocate_shared_memory(gl.bfloat16, [2, BH, DL], QL_SL)  # q of items with keys, by ordinal % 2
    qr_s = gl.allocate_shared_memory(gl.bfloat16, [2, BH, DR], QR_SL)
    kl_s = gl.allocate_shared_memory(gl.bfloat16, [2, 64, DL], KL_SL)  # the tile ring, by global step % 2
    kr_s = gl.allocate_shared_memory(gl.bfloat16, [2, 64, DR], KR_SL)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [64, BH], P_SL)

    pid = gl.program_id(0)
    G = gl.num_programs(0)
    zero = pid * 0
    # page cursor: the tile the next commit group carries (its page ids are loaded one step ahead, so an issue
    # never waits on the page table); it advances as each group is issued
    c_item, c_t, c_lo, c_hi, c_ord = _advance(seq_lens_ptr, pid - G, zero, zero, zero, zero - 1, n_items, min_keys, G,
                                              NUM_SPLITS)
    page_next = _issue_next(ql_s, qr_s, kl_s.index(0), kr_s.index(0), q_ptr, kv_ptr, page_table_ptr, c_item, c_t,
                            c_lo, c_hi, c_ord, c_lo * 0, True, q_st, q_sh, kv_ss, pt_stride, page_size, H,
                            NUM_SPLITS, BH, DL, DR, LD)
    c_item, c_t, c_lo, c_hi, c_ord = _advance(seq_lens_ptr, c_item, c_t, c_lo, c_hi, c_ord, n_items, min_keys, G,
                                              NUM_SPLITS)
    page_next = _tile_pages(page_table_ptr + (c_item // NUM_SPLITS).to(gl.int64) * pt_stride, c_lo + c_t * 64,
                            c_hi, page_size, LD)

    j0 = gl.arange(0, 64, layout=gl.SliceLayout(1, S_L))
    h = gl.arange(0, BH, layout=gl.SliceLayout(0, O_L))
    dl = gl.arange(0, DL, layout=gl.SliceLayout(1, O_L))
    hs = gl.arange(0, BH, layout=gl.SliceLayout(0, S_L))
    g = zero  # global compute step: its tile is in ring stage g % 2
    k_ord = zero - 1  # ordinal of the item computed (counted as the cursor counts)
    for item in range(pid, n_items, G):
        seq, lo, hi = _item(seq_lens_ptr, item, n_items, min_keys, NUM_SPLITS)
        n_tiles = gl.cdiv(hi - lo, 64)
        k_ord += (n_tiles > 0).to(gl.int32)
        ql = ql_s.index(k_ord % 2)
        qr = qr_s.index(k_ord % 2)
        m_i = gl.full([BH], -1.0e30, gl.float32, layout=gl.SliceLayout(0, S_L))
        l_i = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(0, S_L))
        acc = gl.zeros([DL, BH], gl.float32, layout=O_L)  # out^T
        for t in range(n_tiles):
            st = g % 2
            async_copy.wait_group(0)  # this thread's copies of step g's tile (and q, at an item's tile 0)
            fence_async_shared()
            _barrier()  # every thread's; and every warp is done with step g-1's buffers
            _issue_next(ql_s, qr_s, kl_s.index(1 - st), kr_s.index(1 - st), q_ptr, kv_ptr, page_table_ptr, c_item,
                        c_t, c_lo, c_hi, c_ord, page_next, False, q_st, q_sh, kv_ss, pt_stride, page_size, H,
                        NUM_SPLITS, BH, DL, DR, LD)
            c_item, c_t, c_lo, c_hi, c_ord = _advance(seq_lens_ptr, c_item, c_t, c_lo, c_hi, c_ord, n_items,
                                                      min_keys, G, NUM_SPLITS)
            page_next = _tile_pages(page_table_ptr + (c_item // NUM_SPLITS).to(gl.int64) * pt_stride,
                                    c_lo + c_t * 64, c_hi, page_size, LD)
            kl = kl_s.index(st)
            s = warpgroup_mma(kl, ql.permute((1, 0)), gl.zeros([64, BH], gl.float32, layout=S_L),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(kr_s.index(st), qr.permute((1, 0)), s, is_async=True)
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
            g += 1
        # the epilogue of the reference kernel, while the next item's first tile is in flight
        split = item % NUM_SPLITS
        safe_l = gl.where(l_i > 0, l_i, 1.0)
        o = acc / gl.convert_layout(safe_l, gl.SliceLayout(0, O_L))[None, :]
        o_p = out_ptr + seq.to(gl.int64) * o_st + h[None, :] * o_sh + split * o_ss + dl[:, None]
        dl_end = DL
        if NUM_SPLITS > 1:
            dl_end = gl.where(lo < hi, DL, 0)
        gl.store(o_p, o.to(out_ptr.dtype.element_ty), mask=(h[None, :] < H) & (dl[:, None] < dl_end))
        if NUM_SPLITS > 1:
            lse = gl.where(l_i > 0, m_i + gl.log2(safe_l), float("-inf"))
            gl.store(lse_ptr + (seq.to(gl.int64) * H + hs) * NUM_SPLITS + split, lse, mask=hs < H)
    async_copy.wait_group(0)  # no copy outlives the program's shared memory
