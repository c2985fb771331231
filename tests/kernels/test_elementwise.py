"""RMSNorm, RoPE, SiLU-mul and FP8 quantizers vs their torch references (interpreter on CPU)."""

import pytest
import torch

from glmserve.kernels import act_quant, rmsnorm, rope
from glmserve.shared.model import ops

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter truncates fp32 -> bf16 (compiled kernels round): allow two bf16 steps
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _fp8_close(q, q_ref, scale, scale_ref):
    """Scales match; every fp8 value within one e4m3 step (the interpreter's cast may round away)."""
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=1e-12)
    a, b = q.float(), q_ref.float()
    step = torch.clamp(2.0 ** (torch.floor(torch.log2(b.abs().clamp(min=2.0 ** -6))) - 3), min=2.0 ** -9)
    assert ((a - b).abs() <= step + 1e-12).all(), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 37), (3, 5, 24)])
def test_rms_norm(shape, dtype):
    x = torch.randn(shape, device=DEV).to(dtype)
    w = torch.randn(shape[-1], device=DEV).to(dtype)
    out = rmsnorm.rms_norm(x, w, 1e-5)
    ref = rmsnorm.rms_norm_ref(x, w, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype):
    x, r = torch.randn(9, 45, device=DEV).to(dtype), torch.randn(9, 45, device=DEV).to(dtype)
    w = torch.rand(45, device=DEV).to(dtype)
    y, s = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = rmsnorm.add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(s, s_ref, **(dict(rtol=0, atol=0) if dtype == torch.float32 else BF16_TOL))
    torch.testing.assert_close(y, y_ref, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL))


def test_rms_norm_into_rows_of_a_wider_buffer():
    """MLA's cache entry: the normed latent goes into dims [0, L) of a [T, L + R] buffer in place."""
    t, lat, r = 5, 16, 8
    x = torch.randn(t, lat + r, device=DEV)[:, :lat]  # strided rows, as ckv[:, :L]
    w = torch.randn(lat, device=DEV)
    want = ops.rms_norm_ref(x, w, 1e-6)
    for fn in (rmsnorm.rms_norm, ops.rms_norm_ref):
        buf = torch.full((t, lat + r), 7.0, device=DEV)
        got = fn(x, w, 1e-6, buf[:, :lat])
        torch.testing.assert_close(buf[:, :lat], want, rtol=1e-5, atol=1e-5)
        assert got.data_ptr() == buf.data_ptr() and bool((buf[:, lat:] == 7.0).all())


def test_rms_norm_rejects_bad_weight():
    with pytest.raises(ValueError):
        rmsnorm.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_per_token(interleaved):
    t, h, d, rd = 5, 3, 20, 12
    x = torch.randn(t, h, d, device=DEV)
    pos = torch.randint(0, 50, (t,), device=DEV)
    cos, sin = rope.cos_sin_cache(rd, 64, 10000.0, DEV)
    out = rope.rope(x, cos[pos], sin[pos], rd, interleaved)
    torch.testing.assert_close(out, ops.rope_ref(x, cos[pos], sin[pos], rd, interleaved), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_into_a_slice_of_a_head_major_buffer(interleaved):
    """MLA's absorbed query: RoPE writes q_pe into dims [L, L + R) of a [h, T, L + R] buffer seen as
    [T, h, L + R]; the rest of the buffer is left as it was (the kernel and the reference alike)."""
    t, h, lat, rd = 5, 3, 16, 8
    x = torch.randn(t, h, rd, device=DEV)
    pos = torch.randint(0, 50, (t,), device=DEV)
    cos, sin = rope.cos_sin_cache(rd, 64, 10000.0, DEV)
    want = ops.rope_ref(x, cos[pos], sin[pos], rd, interleaved)
    for fn in (rope.rope, ops.rope_ref):
        buf = torch.full((h, t, lat + rd), 7.0, device=DEV)
        got = fn(x, cos[pos], sin[pos], rd, interleaved, buf.transpose(0, 1)[..., lat:])
        torch.testing.assert_close(buf.transpose(0, 1)[..., lat:], want, rtol=1e-5, atol=1e-5)
        assert got.data_ptr() == buf.data_ptr() + lat * buf.element_size()
        assert bool((buf[..., :lat] == 7.0).all())


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_inplace_positions(interleaved):
    t, hq, hk, d, rd = 6, 5, 1, 18, 18
    q, k = torch.randn(t, hq, d, device=DEV), torch.randn(t, hk, d, device=DEV)
    pos = torch.randint(0, 30, (t,), device=DEV)
    cos, sin = rope.cos_sin_cache(rd, 32, 1e6, DEV)
    q_ref, k_ref = ops.rope_ref(q, cos[pos], sin[pos], rd, interleaved), ops.rope_ref(k, cos[pos], sin[pos], rd, interleaved)
    rope.rope_inplace(q, k, pos, cos, sin, rd, interleaved)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = torch.randn(5, 2 * 37, device=DEV).to(dtype)
    torch.testing.assert_close(act_quant.silu_and_mul(x), act_quant.silu_and_mul_ref(x), **BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_silu_and_mul_fp8(dtype):
    x = (torch.randn(6, 2 * 41, device=DEV) * 3).to(dtype)
    q, s = act_quant.silu_and_mul_fp8(x)
    q_ref, s_ref = act_quant.silu_and_mul_fp8_ref(x)
    _fp8_close(q, q_ref, s, s_ref)


@pytest.mark.parametrize("group", [16, 53])
def test_quant_fp8_group_and_per_token(group):
    x = torch.randn(7, 53, device=DEV) * 5
    q, s = act_quant.quant_fp8_group(x, group)
    q_ref, s_ref = act_quant.quant_fp8_group_ref(x, group)
    _fp8_close(q, q_ref, s, s_ref)
    q, s = act_quant.quant_fp8_per_token(x)
    q_ref, s_ref = act_quant.quant_fp8_per_token_ref(x)
    _fp8_close(q, q_ref, s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_fp8_quantizes_its_output(dtype, residual):
    """The fused norm + per-token FP8 (a W8A8 GEMM's input, one launch): the norm's outputs are those of
    the plain kernel, and (q, scale) are quant_fp8_per_token of the normed output exactly (same
    arithmetic), and within one e4m3 step of torch's quantizer."""
    x, r = (torch.randn(9, 45, device=DEV) * 3).to(dtype), torch.randn(9, 45, device=DEV).to(dtype)
    w = torch.rand(45, device=DEV).to(dtype)
    if residual:
        y, s, (q, qs) = rmsnorm.add_rms_norm_fp8(x, r, w, 1e-6)
        y_plain, s_plain = rmsnorm.add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(s, s_plain)
    else:
        y, (q, qs) = rmsnorm.rms_norm_fp8(x, w, 1e-6)
        y_plain = rmsnorm.rms_norm(x, w, 1e-6)
    assert torch.equal(y, y_plain) and q.dtype == torch.float8_e4m3fn and qs.shape == (9, 1)
    q_k, qs_k = act_quant.quant_fp8_per_token(y)
    assert torch.equal(qs, qs_k) and torch.equal(q.float(), q_k.float())
    _fp8_close(q, *act_quant.quant_fp8_per_token_ref(y)[:1], qs, act_quant.quant_fp8_per_token_ref(y)[1])
    # the references make no FP8 form: their consumers keep activations unquantized
    assert ops.rms_norm_fp8_ref(x, w, 1e-6)[1] is None and ops.add_rms_norm_fp8_ref(x, r, w, 1e-6)[2] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [False, True])
def test_add_rms_norm_sums_the_moe_slot_form(dtype, quant):
    """x in the MoE's slot form [T, S, D] (fused_experts(keep_slots=True)): the norm kernel's result is
    bit-identical to the slot-sum kernel followed by the plain fused norm (the two launches it replaces),
    and matches the torch references, which sum the slots the same way."""
    from glmserve.kernels.fused_moe import _sum_slots_kernel

    t, slots, d = 6, 5, 48
    x3 = torch.randn(t, slots, d, device=DEV).to(dtype)
    r = torch.randn(t, d, device=DEV).to(dtype)
    w = torch.rand(d, device=DEV).to(dtype)
    summed = torch.empty(t, d, device=DEV, dtype=dtype)
    _sum_slots_kernel[(t, 1)](x3, summed, d, TOP_K=slots, BLOCK_H=64, num_warps=4)
    if quant:
        y, s, (q, qs) = rmsnorm.add_rms_norm_fp8(x3, r, w, 1e-6)
        y2, s2, (q2, qs2) = rmsnorm.add_rms_norm_fp8(summed, r, w, 1e-6)
        assert torch.equal(q.float(), q2.float()) and torch.equal(qs, qs2)
    else:
        y, s = rmsnorm.add_rms_norm(x3, r, w, 1e-6)
        y2, s2 = rmsnorm.add_rms_norm(summed, r, w, 1e-6)
    assert y.shape == s.shape == (t, d) and torch.equal(y, y2) and torch.equal(s, s2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    for ref in (rmsnorm.add_rms_norm_ref, ops.add_rms_norm_ref):
        y_ref, s_ref = ref(x3, r, w, 1e-6)
        torch.testing.assert_close(s, s_ref, **tol)
        torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(ops.add_rms_norm_ref(x3, r, w, 1e-6)[1], (x3.float().sum(1).to(dtype) + r))
