"""The FP8 GEMV (kernels/fp8_gemv.py, decode's M <= 4 per-channel GEMMs) against the dequantized fp32 reference."""

import pytest
import torch

from glmserve.kernels import fp8_gemm, fp8_gemv
from glmserve.kernels.act_quant import quant_fp8_per_token_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m: int, n: int, k: int):
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(m, k, device=DEV))
    w = torch.randn(n, k, device=DEV)
    w_s = w.abs().amax(-1, keepdim=True) / 448.0
    return a_q, a_s, (w / w_s).to(torch.float8_e4m3fn), w_s


@pytest.mark.parametrize("m,n,k,bias,config", [
    (1, 45, 100, True, None),        # CPU rule (4, 32, 1): 12 N blocks, 4 K chunks, the last 4 wide
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
