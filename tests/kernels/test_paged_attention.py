"""Paged attention kernel vs torch: decode, chunked prefill, GQA and MLA layouts, split-K (interpreter on CPU)."""

import random

import pytest
import torch

from glmserve.kernels.paged_attention import paged_attention, paged_attention_fwd, paged_attention_ref
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype):
    """fp32: full-precision dots (input_precision "ieee", not TF32's 1e-3) in the interpreter and compiled;
    bf16 operands: a few bf16 steps."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=3e-2, atol=3e-2)
PAGE = 4


def _batch(prefix_lens, query_lens, num_pages, seed):
    rng = random.Random(seed)
    pages = list(range(num_pages))
    rng.shuffle(pages)  # non-contiguous, out-of-order pages
    seqs = []
    for p, q in zip(prefix_lens, query_lens):
        n = -(-(p + q) // PAGE)
        seqs.append(([1] * q, p, [pages.pop() for _ in range(n)]))
    mode = ForwardMode.DECODE if all(q == 1 for q in query_lens) else ForwardMode.PREFILL
    return ForwardBatch.build(mode, seqs, PAGE, device=DEV)


def _check(out, ref, dtype):
    assert not torch.isnan(out).any()
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix,query", [([0, 5], [7, 3]), ([9, 0, 2], [1, 1, 1])])
def test_gqa(prefix, query, dtype):
    torch.manual_seed(len(prefix))
    hq, hkv, d = 6, 2, 24
    batch = _batch(prefix, query, 16, seed=1)
    cache = torch.randn(2, 16 * PAGE, hkv, d, device=DEV).to(dtype)
    q = torch.randn(batch.num_tokens, hq, d, device=DEV).to(dtype)
    out = paged_attention(q, cache[0], cache[1], batch, PAGE, d ** -0.5)
    _check(out, paged_attention_ref(q, cache[0], cache[1], batch, PAGE, d ** -0.5), dtype)


def test_mla_latent_cache_v_is_k_prefix():
    torch.manual_seed(3)
    hq, d_latent, d_rope = 5, 40, 8  # MLA: one shared KV head, entry = [latent | rope]
    batch = _batch([3, 6], [4, 1], 12, seed=2)
    cache = torch.randn(12 * PAGE, 1, d_latent + d_rope, device=DEV)
    q = torch.randn(batch.num_tokens, hq, d_latent + d_rope, device=DEV)
    v = cache[..., :d_latent]
    out = paged_attention(q, cache, v, batch, PAGE, 0.1)
    _check(out, paged_attention_ref(q, cache, v, batch, PAGE, 0.1), torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_split_k_long_context(splits):
    torch.manual_seed(4)
    hq, hkv, d = 4, 1, 16
    batch = _batch([37, 5], [1, 1], 16, seed=3)
    cache = torch.randn(2, 16 * PAGE, hkv, d, device=DEV)
    q = torch.randn(batch.num_tokens, hq, d, device=DEV)
    out = paged_attention_fwd(
        q, cache[0], cache[1], batch.page_table, batch.seq_lens, batch.query_start_loc, PAGE, 0.3,
        max_q_len=1, max_seq_len=38, num_splits=splits,
    )
    _check(out, paged_attention_ref(q, cache[0], cache[1], batch, PAGE, 0.3), torch.float32)


def test_rejects_int64_page_table():
    batch = _batch([0], [2], 2, seed=0)
    cache = torch.randn(2, 2 * PAGE, 1, 16, device=DEV)
    q = torch.randn(2, 1, 16, device=DEV)
    with pytest.raises(ValueError):
        paged_attention_fwd(q, cache[0], cache[1], batch.page_table.long(), batch.seq_lens,
                            batch.query_start_loc, PAGE, 1.0, 2, 2)


@pytest.mark.parametrize("splits", [None, 1, 3])
def test_mla_decode_kernel_one_token_per_sequence(splits):
    """Single-token MLA batches take kernels/mla_decode.py (keys in M, all heads per program)."""
    torch.manual_seed(5)
    hq, d_latent, d_rope = 5, 40, 8
    batch = _batch([37, 5, 0], [1, 1, 1], 16, seed=4)
    cache = torch.randn(16 * PAGE, 1, d_latent + d_rope, device=DEV)
    q = torch.randn(batch.num_tokens, hq, d_latent + d_rope, device=DEV)
    v = cache[..., :d_latent]
    ref = paged_attention_ref(q, cache, v, batch, PAGE, 0.1)
    out = paged_attention_fwd(q, cache, v, batch.page_table, batch.seq_lens, batch.query_start_loc, PAGE, 0.1,
                              max_q_len=1, max_seq_len=38, num_splits=splits)
    _check(out, ref, torch.float32)
    from glmserve.kernels.mla_decode import mla_decode  # another config: 2 splits forced, BLOCK_N 16, 2 stages

    out = mla_decode(q, cache, batch.page_table, batch.seq_lens, PAGE, 0.1, 38, d_latent, splits, (16, 4, 2, 0))
    _check(out, ref, torch.float32)
    for prefetch in (False, True):  # page ids loaded in the step or one step ahead: same keys, same result
        out = mla_decode(q, cache, batch.page_table, batch.seq_lens, PAGE, 0.1, 38, d_latent, splits,
                         (16, 4, 2, 0), prefetch=prefetch)
        _check(out, ref, torch.float32)


@pytest.mark.parametrize("min_keys", [16, 32, 1000])
def test_mla_decode_min_keys_leaves_later_splits_empty(min_keys):
    """8 splits, each at least min_keys keys: the 5-key sequence fills one split, the 37-key one 1..3,
    the rest are empty (l = 0, lse -inf) and the merge must weigh them 0 (their partials start as NaN
    under KERNELS_POISON)."""
    from glmserve.kernels.mla_decode import mla_decode

    torch.manual_seed(6)
    hq, d_latent, d_rope = 5, 40, 8
    batch = _batch([37, 5, 60], [1, 1, 1], 32, seed=5)
    cache = torch.randn(32 * PAGE, 1, d_latent + d_rope, device=DEV)
    q = torch.randn(batch.num_tokens, hq, d_latent + d_rope, device=DEV)
    ref = paged_attention_ref(q, cache, cache[..., :d_latent], batch, PAGE, 0.1)
    out = mla_decode(q, cache, batch.page_table, batch.seq_lens, PAGE, 0.1, 61, d_latent, 8, (16, 4, 1, 0),
                     min_keys=min_keys)
    _check(out, ref, torch.float32)


def test_mla_split_rule_on_a_tuned_gpu():
    """tuned_splits with the H200's 132 SMs and 4 tuned splits: a batch that fills the SMs takes one split
    (no partials; B 256 measured 157 -> 111 us), from half the SMs two, a tiny batch spreads its keys over
    the idle SMs, batches in between keep the tuned 4."""
    from glmserve.kernels.mla_decode import MAX_SPLITS, tuned_splits

    assert tuned_splits(256, 132, 4) == tuned_splits(132, 132, 4) == 1
    assert tuned_splits(131, 132, 4) == tuned_splits(66, 132, 4) == 2
    assert tuned_splits(65, 132, 4) == tuned_splits(64, 132, 4) == tuned_splits(16, 132, 4) == 4
    assert tuned_splits(8, 132, 4) == 17 and tuned_splits(1, 132, 4) == min(132, MAX_SPLITS)


def test_mla_wg_split_rule():
    """wg_splits: the warpgroup-MMA kernel's one-program-per-SM grid filled about once (132 SMs): no split
    once B fills the SMs (B 128: 40.7 us vs 57.3 with two, H100 run 23), two at B 64 (ctx 4096: 110.8 vs
    148.3 with one), a single sequence over MAX_SPLITS programs (MIN_KEYS then keeps short ones on few)."""
    from glmserve.kernels.mla_decode import MAX_SPLITS, wg_splits

    assert wg_splits(256, 132) == wg_splits(132, 132) == wg_splits(128, 132) == wg_splits(67, 132) == 1
    assert wg_splits(66, 132) == wg_splits(64, 132) == 2
    assert wg_splits(8, 132) == 16 and wg_splits(1, 132) == MAX_SPLITS and wg_splits(0, 132) == MAX_SPLITS
