"""MLA's absorbed up-projection GEMMs (kernels/mla_absorb.py) vs the op reference (interpreter on CPU)."""

import pytest
import torch

from glmserve.kernels.mla_absorb import mla_absorb
from glmserve.shared.model import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # the interpreter truncates fp32 -> bf16 (compiled rounds)


def _kv_b(h, nope, v, lora, fp8, dtype, seed):
    """kv_b_proj's weight [h * (nope + v), L] (+ per-row scale [h * (nope + v), 1]) and the W_UK / W_UV views
    the MLA layer hands the op."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h * (nope + v), lora, generator=g) / lora ** 0.5
    scale = None
    if fp8:
        scale = (w.abs().amax(-1, keepdim=True) / ops.FP8_MAX).to(DEV)
        w = (w.to(DEV) / scale).to(torch.float8_e4m3fn)
    else:
        w = w.to(DEV, dtype)
    w3 = w.view(h, nope + v, lora)
    s2 = scale.view(h, nope + v) if fp8 else None
    uk = (w3[:, :nope], s2[:, :nope] if fp8 else None)
    uv = (w3[:, nope:], s2[:, nope:] if fp8 else None)
    return uk, uv


@pytest.mark.parametrize("t", [1, 5, 19])
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(t, fp8, dtype):
    """Both projections with the MLA layer's layouts: a strided q_nope slice in, W_UK's product written into
    the query buffer's first L dims ([h, T, L + R] seen as [T, h, L]); o_lat in, W_UV's product into a
    [T, h * v] buffer. nope 24, L 40, v 20: no dim a multiple of the CPU blocks."""
    h, nope, rope, v, lora = 3, 24, 8, 20, 40
    (w_uk, s_uk), (w_uv, s_uv) = _kv_b(h, nope, v, lora, fp8, dtype, seed=t)
    g = torch.Generator().manual_seed(100 + t)
    q = torch.randn(t, h, nope + rope, generator=g).to(DEV, dtype)
    o_lat = torch.randn(t, h, lora, generator=g).to(DEV, dtype)
    results = []
    for fn in (mla_absorb, ops.mla_absorb_ref):
        query_ht = torch.full((h, t, lora + rope), 7.0, device=DEV, dtype=dtype)
        fn(q[..., :nope], w_uk, s_uk, True, query_ht.transpose(0, 1)[..., :lora])
        o = torch.full((t, h * v), 7.0, device=DEV, dtype=dtype)
        fn(o_lat, w_uv, s_uv, False, o.view(t, h, v))
        results.append((query_ht, o))
    (qk, ok), (qr, orf) = results
    assert torch.equal(qk[..., lora:], torch.full_like(qk[..., lora:], 7.0))  # q_pe's dims untouched
    torch.testing.assert_close(qk.float(), qr.float(), **TOL[dtype])
    torch.testing.assert_close(ok.float(), orf.float(), **TOL[dtype])
    # the reference itself: per head, a @ (float(W) * s) -- the scale multiplies W's rows
    wd = (w_uk.float() * s_uk[..., None]) if fp8 else w_uk.float()
    want = torch.einsum("thk,hkn->thn", q[..., :nope].float(), wd)
    torch.testing.assert_close(qr.transpose(0, 1)[..., :lora].float(), want, rtol=2e-2, atol=2e-2)


def test_fp8_scales_are_applied_per_weight_row():
    """A scale of 0 on one W_UV row (one output dim of one head) zeroes exactly that output column; one on a
    W_UK row (one K index) removes that dim's contribution: the kernel must index scales by row, per head."""
    h, nope, v, lora, t = 2, 16, 16, 32, 3
    (w_uk, s_uk), (w_uv, s_uv) = _kv_b(h, nope, v, lora, True, torch.float32, seed=3)
    s_uv[1, 5] = 0.0
    s_uk[0, 2] = 0.0
    a = torch.randn(t, h, lora, device=DEV)
    o = mla_absorb(a, w_uv, s_uv, False, torch.empty(t, h, v, device=DEV))
    assert torch.equal(o[:, 1, 5], torch.zeros(t, device=DEV)) and (o[:, 0, 5] != 0).all()
    q = torch.zeros(t, h, nope, device=DEV)
    q[:, 0, 2] = 1.0  # only the zero-scaled row contributes
    out = mla_absorb(q, w_uk, s_uk, True, torch.empty(t, h, lora, device=DEV))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("t", [1, 20])  # 20: two M blocks of the CPU config's 16
@pytest.mark.parametrize("interleaved,rotary_dim", [(True, 8), (False, 4)])
def test_w_uk_launch_ropes_q_pe_as_mla_kv_write(t, interleaved, rotary_dim):
    """mla_absorb's rope (the W_UK launch also writes q_out = rope(q_pe), the job mla_prep leaves out): the same
    bits as mla_kv_write's query RoPE, written into the query buffer's last R dims; the product unchanged."""
    from glmserve.kernels.mla_kv_write import mla_kv_write

    h, nope, rope, v, lora, dtype = 3, 24, 8, 20, 40, torch.bfloat16
    (w_uk, s_uk), _ = _kv_b(h, nope, v, lora, True, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(t, h, nope + rope, generator=g).to(DEV, dtype)
    pos = torch.randint(0, 100, (t,), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = (pos[:, None] * inv[None, :]).to(DEV)
    cos, sin = freqs.cos(), freqs.sin()
    query_ht = torch.full((h, t, lora + rope), 7.0, device=DEV, dtype=dtype)
    query = query_ht.transpose(0, 1)
    mla_absorb(q[..., :nope], w_uk, s_uk, True, query[..., :lora],
               (q[..., nope:], cos, sin, query[..., lora:], rotary_dim, interleaved))
    plain = mla_absorb(q[..., :nope], w_uk, s_uk, True, torch.empty(t, h, lora, device=DEV, dtype=dtype))
    assert torch.equal(query[..., :lora], plain)
    want = torch.zeros(t, h, rope, device=DEV, dtype=dtype)
    ckv = torch.randn(t, lora + rope, device=DEV, dtype=dtype)
    cache = torch.zeros(t, 1, lora + rope, device=DEV, dtype=dtype)
    mla_kv_write(ckv, torch.ones(lora, device=DEV, dtype=dtype), 1e-6, cos, sin, cache,
                 torch.arange(t, device=DEV), q[..., nope:], want, rotary_dim, interleaved)
    assert torch.equal(query[..., lora:], want)


@pytest.mark.parametrize("t", [1, 20, 37])  # 20, 37: two and three M blocks of the CPU config's 16
def test_w_uk_launch_does_mla_kv_write_in_programs_of_its_own(t):
    """mla_absorb's kv_write (mla.KV_WRITE_IN_ABSORB_MAX_T): the launch's extra N block of programs writes the tokens'
    cache entries and the query RoPE with mla_kv_write's helpers: cache rows (at scattered slots, others untouched),
    roped q_pe and the product all equal mla_kv_write + mla_absorb's, bit for bit; the reference op does the same."""
    from glmserve.kernels.mla_kv_write import mla_kv_write

    h, nope, rope, v, lora, rotary_dim, dtype = 3, 24, 8, 20, 40, 8, torch.bfloat16
    (w_uk, s_uk), _ = _kv_b(h, nope, v, lora, True, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    q = torch.randn(t, h, nope + rope, generator=g).to(DEV, dtype)
    ckv = torch.randn(t, lora + rope + 16, generator=g).to(DEV, dtype)[:, : lora + rope]  # rows of a wider buffer
    norm_w = (torch.rand(lora, generator=g) + 0.5).to(DEV, dtype)
    freqs = (torch.randint(0, 100, (t,), generator=g).float()[:, None]
             * (1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))[None, :]).to(DEV)
    cos, sin = freqs.cos(), freqs.sin()
    slots = torch.randperm(2 * t, generator=g)[:t].to(DEV)
    results = []
    for fused in ("kernel", "separate", "ref"):
        cache = torch.full((2 * t, 1, lora + rope), 7.0, device=DEV, dtype=dtype)
        query_ht = torch.full((h, t, lora + rope), 7.0, device=DEV, dtype=dtype)
        query = query_ht.transpose(0, 1)
        kv = (ckv, norm_w, 1e-6, cos, sin, cache, slots, q[..., nope:], query[..., lora:], rotary_dim, False)
        if fused == "kernel":
            mla_absorb(q[..., :nope], w_uk, s_uk, True, query[..., :lora], None, kv)
        elif fused == "separate":
            mla_kv_write(*kv)
            mla_absorb(q[..., :nope], w_uk, s_uk, True, query[..., :lora])
        else:
            ops.mla_absorb_ref(q[..., :nope], w_uk, s_uk, True, query[..., :lora], None, kv)
        results.append((cache, query_ht))
    (ck, qk), (cs, qs), (cr, qr) = results
    assert torch.equal(ck, cs) and torch.equal(qk, qs)
    assert not torch.equal(ck, torch.full_like(ck, 7.0))
    torch.testing.assert_close(ck.float(), cr.float(), **TOL[dtype])
    torch.testing.assert_close(qk.float(), qr.float(), **TOL[dtype])
