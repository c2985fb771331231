"""MLA's fused cache write + query RoPE (kernels/mla_kv_write.py) vs the op reference (interpreter on CPU)."""

import pytest
import torch

from glmserve.kernels.mla_kv_write import mla_kv_write
from glmserve.shared.model import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # the interpreter truncates fp32 -> bf16 (compiled kernels round)


def _inputs(t, h, lora, rot, dtype, seed, rotary_dim=None):
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(t, 8 + lora + rot, generator=g).to(DEV, dtype)  # [q_a | latent | k_pe], as the fused GEMM
    ckv = fused[:, 8:]  # a column slice: row stride 8 + L + R
    w = (1 + 0.1 * torch.randn(lora, generator=g)).to(DEV, dtype)
    pos = torch.randint(0, 100, (t,), generator=g).float()
    rd = rotary_dim or rot
    inv = 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd)
    freqs = (pos[:, None] * inv[None, :]).to(DEV)
    q = torch.randn(t, h, 16 + rot, generator=g).to(DEV, dtype)  # [nope | rope] per head
    slots = torch.randperm(3 * t, generator=g)[:t].to(DEV)  # scattered, out of order
    return ckv, w, freqs.cos(), freqs.sin(), q[..., 16:], slots


@pytest.mark.parametrize("dtype,interleaved,rotary_dim", [(torch.float32, True, 8), (torch.bfloat16, True, 8),
                                                          (torch.float32, False, 8), (torch.float32, True, 4)])
def test_matches_reference(dtype, interleaved, rotary_dim):
    """rotary_dim 4 of R 8: the last 4 dims pass through (partial RoPE)."""
    t, h, lora, rot = 5, 3, 40, 8
    ckv, w, cos, sin, q_pe, slots = _inputs(t, h, lora, rot, dtype, seed=1, rotary_dim=rotary_dim)
    caches, outs = [], []
    for fn in (mla_kv_write, ops.mla_kv_write_ref):
        cache = torch.full((3 * t, 1, lora + rot), 7.0, device=DEV, dtype=dtype)  # untouched slots stay 7
        query_ht = torch.zeros(h, t, 24 + rot, device=DEV, dtype=dtype)  # q_out: a strided slice, as in MLA
        q_out = query_ht.transpose(0, 1)[..., 24:]
        fn(ckv, w, 1e-6, cos, sin, cache, slots, q_pe, q_out, rotary_dim, interleaved)
        caches.append(cache)
        outs.append(query_ht)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(caches[0], caches[1], **tol)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    untouched = torch.ones(3 * t, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert (caches[0][untouched] == 7).all() and (outs[0][..., :24] == 0).all()


def test_rejects_bad_cos_sin():
    ckv, w, cos, sin, q_pe, slots = _inputs(4, 2, 16, 8, torch.float32, seed=2)
    cache = torch.zeros(12, 1, 24, device=DEV)
    with pytest.raises(ValueError, match="cos/sin"):
        mla_kv_write(ckv, w, 1e-6, cos[:, :2], sin[:, :2], cache, slots, q_pe, q_pe.clone(), 8, True)


@pytest.mark.parametrize("quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prep_equals_norm_then_kv_write(quant, dtype):
    """mla_prep (q_a's RMSNorm + the cache write in one launch) gives the bits of rms_norm(_fp8) on q_a and of
    mla_kv_write's cache entries, and leaves q_pe alone (its RoPE is the W_UK launch's, tests/kernels/
    test_mla_absorb.py)."""
    from glmserve.kernels.mla_kv_write import mla_prep
    from glmserve.kernels.rmsnorm import rms_norm, rms_norm_fp8

    t, h, lora, rot, lq = 5, 3, 40, 8, 24
    ckv, w, cos, sin, q_pe, slots = _inputs(t, h, lora, rot, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    q_a = torch.randn(t, lq + 9, generator=g).to(DEV, dtype)[:, 9:]  # a column slice, as the fused GEMM's rows
    qa_w = (1 + 0.1 * torch.randn(lq, generator=g)).to(DEV, dtype)
    cache, cache_ref = (torch.full((3 * t, 1, lora + rot), 7.0, device=DEV, dtype=dtype) for _ in range(2))
    y, y_fp8 = mla_prep(q_a, qa_w, 1e-6, ckv, w, 1e-6, cos, sin, cache, slots, rot, True, quant)
    q_out = torch.zeros_like(q_pe)
    mla_kv_write(ckv, w, 1e-6, cos, sin, cache_ref, slots, q_pe, q_out, rot, True)
    assert torch.equal(cache, cache_ref)
    if quant:
        y_ref, (q_ref, s_ref) = rms_norm_fp8(q_a, qa_w, 1e-6)
        assert torch.equal(y_fp8[0].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(y_fp8[1], s_ref)
    else:
        y_ref = rms_norm(q_a, qa_w, 1e-6)
        assert y_fp8 is None
    assert torch.equal(y, y_ref)
    want, _ = ops.mla_prep_ref(q_a, qa_w, 1e-6, ckv, w, 1e-6, cos, sin, cache_ref, slots, rot, True, quant)
    torch.testing.assert_close(y.float(), want.float(), **(BF16_TOL if dtype == torch.bfloat16 else {}))
