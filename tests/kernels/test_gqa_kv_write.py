"""GQA's fused prologue (kernels/gqa_kv_write.py: q/k norms, RoPE, K/V cache write) vs the op reference."""

import pytest
import torch

from glmserve.kernels.gqa_kv_write import gqa_kv_write
from glmserve.shared.model import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # the interpreter truncates fp32 -> bf16 (compiled kernels round)


def _inputs(t, hq, hkv, d, rotary_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(DEV, dtype)  # the fused qkv GEMM's output
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)  # strided views, as in the layer
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype)
    pos = torch.randint(0, 200, (t,), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = (pos[:, None] * inv[None, :]).to(DEV)
    slots = torch.randperm(3 * t, generator=g)[:t].to(DEV)
    return q, k, v, qw, kw, freqs.cos(), freqs.sin(), slots


@pytest.mark.parametrize("dtype,norm,rotary_dim,interleaved", [
    (torch.float32, True, 8, False),   # glm4_moe: partial NeoX RoPE (half of D), qk norm
    (torch.bfloat16, True, 8, False),
    (torch.float32, False, 8, False),  # GLM-4.5 without qk norm
    (torch.float32, True, 16, True),   # full, interleaved
])
def test_matches_reference(dtype, norm, rotary_dim, interleaved):
    t, hq, hkv, d = 5, 6, 2, 16
    q, k, v, qw, kw, cos, sin, slots = _inputs(t, hq, hkv, d, rotary_dim, dtype, seed=1)
    res = []
    for fn in (gqa_kv_write, ops.gqa_kv_write_ref):
        k_cache = torch.full((3 * t, hkv, d), 7.0, device=DEV, dtype=dtype)  # untouched slots stay 7
        v_cache = torch.full((3 * t, hkv, d), 7.0, device=DEV, dtype=dtype)
        q_out = fn(q, k, v, qw if norm else None, kw if norm else None, 1e-5, cos, sin, rotary_dim, interleaved,
                   k_cache, v_cache, slots)
        res.append((q_out, k_cache, v_cache))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    for got, ref in zip(res[0], res[1]):
        torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(res[0][2][slots], v.to(dtype))  # V is copied, not transformed
    untouched = torch.ones(3 * t, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert (res[0][1][untouched] == 7).all() and (res[0][2][untouched] == 7).all()


def test_rejects_bad_rotary_dim():
    q, k, v, qw, kw, cos, sin, slots = _inputs(3, 4, 2, 16, 8, torch.float32, seed=2)
    cache = torch.zeros(9, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="rotary_dim"):
        gqa_kv_write(q, k, v, qw, kw, 1e-5, cos, sin, 7, False, cache, cache.clone(), slots)
