"""The FP8 GEMV (kernels/fp8_gemv.py, decode's M <= 4 per-channel GEMMs) against the dequantized fp32 reference."""

import pytest
import torch

from glmserve.kernels import fp8_gemm, fp8_gemv
from glmserve.kernels.act_quant import quant_fp8_per_token_ref
from tests.kernels.norm_checks import assert_norm_outputs_match, forbid_norm_launches

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m: int, n: int, k: int):
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(m, k, device=DEV))
    w = torch.randn(n, k, device=DEV)
    w_s = w.abs().amax(-1, keepdim=True) / 448.0
    return a_q, a_s, (w / w_s).to(torch.float8_e4m3fn), w_s


@pytest.mark.parametrize("m,n,k,bias,config", [
    (1, 45, 100, True, None),        # CPU rule (16, 128, 1): 3 N blocks (a tail of 13), one K chunk with a tail
    (3, 37, 96, False, None),         # three rows; K an exact multiple of the chunk
    (2, 70, 300, True, (8, 64, 2)),   # explicit config: 5 chunks, N tail of 6
    (4, 16, 40, False, (16, 64, 4)),  # one chunk wider than K
])
def test_gemv_matches_reference(m, n, k, bias, config):
    a_q, a_s, w_q, w_s = _operands(m, n, k)
    b = torch.randn(n, device=DEV) if bias else None
    out = torch.full((m, n), float("nan"), device=DEV)
    fp8_gemv.fp8_gemv(a_q, a_s, w_q, w_s, b, out, config)
    torch.testing.assert_close(out, fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32), rtol=1e-5, atol=1e-4)


def test_gemv_strided_rows_and_bf16_out():
    """A rows with a stride wider than K (a view into a fused buffer) and a bf16 output: within one bf16 step
    (2^-7 of |ref|) of the reference (the interpreter's bf16 cast truncates; the GPU's rounds to nearest)."""
    m, n, k = 2, 24, 64
    a_q, a_s, w_q, w_s = _operands(m, n, k)
    wide = torch.zeros(m, k + 32, device=DEV, dtype=torch.float8_e4m3fn)
    wide[:, :k] = a_q
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    fp8_gemv.fp8_gemv(wide[:, :k], a_s, w_q, w_s, None, out)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32)
    assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()


@pytest.mark.parametrize("a_div,mul_weight,config", [(3, False, None), (1, True, (8, 64, 2))])
def test_moe_gemv_matches_reference(a_div, mul_weight, config):
    """moe_gemv: c[p] = (A[p // a_div] . B[ids[p]]^T) * s_a * s_b (* w[p]) for every pair, experts repeated and in
    any order (no alignment by expert)."""
    from glmserve.kernels.fp8_gemv import moe_gemv

    e, n, k, pairs = 5, 45, 100, 6
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(pairs // a_div, k, device=DEV))
    b = torch.randn(e, n, k, device=DEV)
    b_s = b.abs().amax(-1) / 448.0  # [E, N]
    b_q = (b / b_s[..., None]).to(torch.float8_e4m3fn)
    ids = torch.tensor([4, 0, 4, 2, 2, 1], device=DEV, dtype=torch.int32)
    w = torch.rand(pairs, device=DEV)
    out = torch.full((pairs, n), float("nan"), device=DEV)
    moe_gemv(a_q, a_s, b_q, b_s, out, w, ids, a_div, mul_weight, config)
    rows = torch.arange(pairs, device=DEV) // a_div
    ref = torch.einsum("pk,pnk->pn", a_q[rows].float(), b_q[ids.long()].float()) * a_s[rows] * b_s[ids.long()]
    if mul_weight:
        ref = ref * w[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("keep_slots", [False, True])
def test_experts_gemv_path_matches_the_grouped_gemm_path(keep_slots):
    """fused_moe's GEMV path (the GEMMs of T <= GEMV_MAX_T tokens) gives fused_experts' grouped-GEMM result to fp32
    sum order: the same quantized activations, the same SiLU-mul, the same weighted rows."""
    from glmserve.kernels import fused_moe

    torch.manual_seed(0)
    t, h, i, e, k = 3, 64, 40, 6, 3
    x = torch.randn(t, h, device=DEV)
    w13, w2 = torch.randn(e, 2 * i, h, device=DEV), torch.randn(e, h, i, device=DEV)
    s13, s2 = w13.abs().amax(-1, keepdim=True) / 448.0, w2.abs().amax(-1, keepdim=True) / 448.0
    q13, q2 = (w13 / s13).to(torch.float8_e4m3fn), (w2 / s2).to(torch.float8_e4m3fn)
    ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    weights = torch.rand(t, k, device=DEV)
    gemv = fused_moe._experts_gemv(x, q13, q2, weights, ids, s13, s2, None, keep_slots)
    grouped = fused_moe.fused_experts(x, q13, q2, weights, ids, s13, s2, keep_slots=keep_slots)
    assert gemv.shape == grouped.shape == ((t, k, h) if keep_slots else (t, h))
    torch.testing.assert_close(gemv, grouped, rtol=1e-4, atol=1e-4)


# (config, K): the CPU rule (16, 128, 1) and (2, 64, 2) load A into every tile row; BLOCK_K 256 x 1 warp tiles a
# 16-bit row's layout (a_rows), so A loads once as a [1, BLOCK_K] row and broadcasts, in three chunks with a tail
_A_MODE_CASES = [(None, 300), ((4, 256, 1), 600), ((2, 64, 2), 64)]


@pytest.mark.parametrize("config,k", _A_MODE_CASES)
def test_gemv_quantizing_a_equals_the_quant_launch_then_the_gemv(config, k):
    """A_QUANT: the GEMV quantizes its 16-bit A rows per token itself; the result is quant_fp8_per_token then the
    e4m3 GEMV, bit for bit (the same e4m3 operand, scale and sum order)."""
    from glmserve.kernels.act_quant import quant_fp8_per_token

    m, n = 3, 37
    x = (torch.randn(m, k, device=DEV) * torch.tensor([0.01, 1.0, 30.0], device=DEV)[:, None]).to(torch.bfloat16)
    _, _, w_q, w_s = _operands(m, n, k)
    b = torch.randn(n, device=DEV)
    fused, split = (torch.full((m, n), float("nan"), device=DEV) for _ in range(2))
    fp8_gemv.fp8_gemv(x, None, w_q, w_s, b, fused, config, a_mode=fp8_gemv.A_QUANT)
    xq, xs = quant_fp8_per_token(x)
    fp8_gemv.fp8_gemv(xq, xs, w_q, w_s, b, split, config)
    assert torch.equal(fused, split)
    assert not torch.equal(split, torch.zeros_like(split))


@pytest.mark.parametrize("config,k", _A_MODE_CASES)
def test_moe_gemv_silu_a_equals_the_silu_launch_then_the_gemv(config, k):
    """A_SILU (the down GEMV): the program forms silu(gate) * up from the gate_up rows [P, 2K] and quantizes it per
    pair itself; the result is silu_and_mul_fp8 then the e4m3 GEMV, bit for bit. A_QUANT on the gate_up GEMV's
    16-bit x equals quant_fp8_per_token then the GEMV the same way."""
    from glmserve.kernels.act_quant import quant_fp8_per_token, silu_and_mul_fp8
    from glmserve.kernels.fp8_gemv import A_QUANT, A_SILU, moe_gemv

    e, n, pairs = 5, 21, 6  # N: a partial last block in every config (16, 4 and 2 columns a program)
    gate_up = (torch.randn(pairs, 2 * k, device=DEV) * 3).to(torch.bfloat16)
    b = torch.randn(e, n, k, device=DEV)
    b_s = b.abs().amax(-1) / 448.0
    b_q = (b / b_s[..., None]).to(torch.float8_e4m3fn)
    ids = torch.tensor([4, 0, 4, 2, 2, 1], device=DEV, dtype=torch.int32)
    w = torch.rand(pairs, device=DEV)
    fused, split = (torch.full((pairs, n), float("nan"), device=DEV) for _ in range(2))
    moe_gemv(gate_up, None, b_q, b_s, fused, w, ids, 1, True, config, a_mode=A_SILU)
    act, act_s = silu_and_mul_fp8(gate_up)
    moe_gemv(act, act_s, b_q, b_s, split, w, ids, 1, True, config)
    assert torch.equal(fused, split)

    x = gate_up[:2, :k].contiguous()  # two tokens, three pairs each (a_div 3)
    moe_gemv(x, None, b_q, b_s, fused, w, ids, 3, False, config, a_mode=A_QUANT)
    moe_gemv(*quant_fp8_per_token(x), b_q, b_s, split, w, ids, 3, False, config)
    assert torch.equal(fused, split)


def test_gemv_a_modes_reject_mismatched_rows():
    from glmserve.kernels.fp8_gemv import A_QUANT, A_SILU, moe_gemv

    _, _, w_q, w_s = _operands(1, 8, 32)
    out = torch.empty(1, 8, device=DEV)
    with pytest.raises(ValueError, match="16-bit"):
        fp8_gemv.fp8_gemv(torch.zeros(1, 32, device=DEV), None, w_q, w_s, None, out, a_mode=A_QUANT)
    with pytest.raises(ValueError, match="2K"):
        moe_gemv(torch.zeros(1, 32, device=DEV, dtype=torch.bfloat16), None, w_q[None], w_s.reshape(1, 8), out,
                 torch.ones(1, device=DEV), torch.zeros(1, device=DEV, dtype=torch.int32), 1, True, a_mode=A_SILU)


@pytest.mark.parametrize("config,k", [(None, 100), ((4, 256, 1), 200), ((2, 64, 2), 64)])
def test_gemv_normalising_a_equals_the_norm_launch_then_the_gemv(config, k):
    """A_NORM: the GEMV RMS-normalises its 16-bit rows (weight, eps) and quantizes them itself; the result is
    rms_norm_fp8's FP8 form then the e4m3 GEMV, bit for bit here (rows read through a wider buffer's stride, as
    q_a is a view of the fused q_a + kv_a output)."""
    from glmserve.kernels.rmsnorm import rms_norm_fp8

    m, n = 3, 37
    wide = (torch.randn(m, k + 24, device=DEV) * torch.tensor([0.01, 1.0, 30.0], device=DEV)[:, None])
    x = wide.to(torch.bfloat16)[:, :k]
    nw = (torch.rand(k, device=DEV) + 0.5).to(torch.bfloat16)
    _, _, w_q, w_s = _operands(m, n, k)
    fused, split = (torch.full((m, n), float("nan"), device=DEV) for _ in range(2))
    fp8_gemv.fp8_gemv(x, None, w_q, w_s, None, fused, config, a_mode=fp8_gemv.A_NORM, norm=(nw, 1e-6))
    _, (xq, xs) = rms_norm_fp8(x, nw, 1e-6)
    fp8_gemv.fp8_gemv(xq, xs, w_q, w_s, None, split, config)
    assert torch.equal(fused, split)
    with pytest.raises(ValueError, match="A_NORM"):
        fp8_gemv.fp8_gemv(x, None, w_q, w_s, None, fused, config, a_mode=fp8_gemv.A_NORM)


@pytest.mark.parametrize("t,quant", [(1, True), (3, False), (4, True)])
def test_next_norm_in_the_down_gemv_equals_the_norm_launch(t, quant, monkeypatch):
    """fused_moe.fused_experts_norm with NEXT_NORM_MAX_T (the down GEMV's last program of each token sums its slot
    rows, adds the residual and runs the next layer's input norm) against its two-launch form (NEXT_NORM_MAX_T 0:
    fused_experts(keep_slots=True), then add_rms_norm(_fp8) on the slot form): s, y and y's FP8 form bit-equal under
    the interpreter (to fp32 sum order on a GPU), no norm launch, the arrival counters back at 0, twice in a row."""
    from glmserve.kernels import _common, fused_moe

    monkeypatch.setattr(fused_moe, "uses_gemv", lambda t, fp8, device: fp8 and t <= 4)  # CUDA-only: forced here
    g = torch.Generator().manual_seed(t)
    h, i, e, k = 96, 40, 6, 3  # H: masked tails in the last N block and the norm's row
    x = torch.randn(t, h, generator=g).to(DEV, torch.bfloat16)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    s13, s2 = w13.abs().amax(-1, keepdim=True) / 448.0, w2.abs().amax(-1, keepdim=True) / 448.0
    q13, q2 = (w13 / s13).to(DEV, torch.float8_e4m3fn), (w2 / s2).to(DEV, torch.float8_e4m3fn)
    s13, s2 = s13.to(DEV), s2.to(DEV)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEV)
    weights = torch.rand(t, k, generator=g).to(DEV)
    res = (torch.randn(t, h, generator=g) * 2).to(DEV, torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(h, generator=g)).to(DEV, torch.bfloat16)
    args = (x, q13, q2, weights, ids, s13, s2, False, None, None, res, nw, 1e-5, quant)
    monkeypatch.setattr(fused_moe, "NEXT_NORM_MAX_T", 0)
    want = fused_moe.fused_experts_norm(*args)
    monkeypatch.setattr(fused_moe, "NEXT_NORM_MAX_T", 4)
    forbid_norm_launches(monkeypatch)
    for _ in range(2):
        assert_norm_outputs_match(fused_moe.fused_experts_norm(*args), want, exact=DEV == "cpu")
        assert not _common._arrival[x.device].any()
