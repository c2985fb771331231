"""Decode-sized dense and MoE FP8 GEMMs at GLM-4.5-Air / GLM-4.7-Flash shapes on CUDA only: split-K (inline,
in CUDA graphs), the mid-M TMA kernel, and the GEMVs for M / T <= 4 with their quantizing A modes.

Run on the device: `pytest -q -m gpu tests/kernels` (bench/gpu_suite.sh).
"""

import pytest
import torch

from glmserve.kernels import _common, act_quant, fp8_gemm, fp8_gemv, fused_moe
from tests.kernels.gpu_shapes import BF16, DEV, assert_sum_order_close, gemm_replayed, per_channel_operands, rel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m,n,k", [(32, 1024, 4096), (8, 4096, 12288), (64, 2048, 5120)])
def test_fp8_gemm_decode_split_k(m, n, k):
    a_q, a_s, w_q, w_s = per_channel_operands(m, n, k)
    bias = torch.randn(n, device=DEV, dtype=BF16)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, bias, torch.float32)
    for split in (None, 1, 4):
        assert rel(fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, bias, split_k=split), ref) < 5e-3


@pytest.mark.parametrize("m,n,k", [(1, 2048, 5120), (4, 5120, 768), (32, 1344, 2048)])
def test_fp8_gemm_split_k_inline_in_a_cuda_graph(m, n, k, monkeypatch):
    """SPLITK_INLINE at GLM-4.7-Flash's decode shapes: the same bits as the reduce kernel, on every replay of a
    CUDA graph with two split-K GEMMs back to back (they share the arrival counters), counters back at 0."""
    a_q, a_s, w_q, w_s = per_channel_operands(m, n, k)
    want = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, None, split_k=8)
    monkeypatch.setattr(fp8_gemm, "SPLITK_INLINE", True)
    assert torch.equal(fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, None, split_k=8), want)  # counters made here
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, None, split_k=8) for _ in range(2)]
    for _ in range(3):
        for o in outs:
            o.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, want) for o in outs)
    assert not _common._arrival[a_q.device].any()


@pytest.mark.parametrize("m,n,k", [(256, 2048, 5120), (100, 1344, 2048), (129, 20480, 2048)])
def test_fp8_gemm_tma_mid_in_a_cuda_graph(m, n, k, monkeypatch):
    """Decode-batch GEMMs with K >= TMA_MID_MIN_K take the TMA kernel (host tensor descriptors) inside the decode
    CUDA graph: the replayed result must be the eager one, and match the reference, with new inputs copied in."""
    monkeypatch.setattr(fp8_gemm, "TMA_MID_M", fp8_gemm.TMA_MID_ON)
    assert fp8_gemm._use_tma(torch.empty(m, k, device=DEV, dtype=torch.float8_e4m3fn),
                             torch.empty(n, k, device=DEV, dtype=torch.float8_e4m3fn), m, 0, None)
    a_q, a_s, w_q, w_s, out = gemm_replayed(m, n, k)
    assert rel(out, fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32)) < 5e-3


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(1344, 2048), (5120, 768), (2048, 5120), (4096, 4096)])
def test_fp8_gemv_in_a_cuda_graph(m, n, k, monkeypatch):
    """fp8_gemm.GEMV_MAX_M routes decode's M <= 4 per-channel GEMMs (GLM-4.7-Flash's q_a + kv_a, q_b, o_proj; a
    GLM-4.5-Air-sized square one) to the GEMV kernel, PDL-launched inside the decode CUDA graph: the replay equals
    the eager call with new inputs copied in, matches the fp32 reference to bf16 rounding (full fp32 sums, no MMA
    accumulation error), and the MMA kernel's result to its accumulation error."""
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_M", 4)
    a_q, a_s, w_q, w_s, out = gemm_replayed(m, n, k)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32)
    # half a bf16 step, plus the fp32 sums' order: <= ~20 roundings of 2^-24 of sum |a w| (a thread's pieces, trees
    # over the lanes and warps, then <= 3 chunks), bounded here by 2^-16 of it
    mags = (a_q.float().abs() @ w_q.float().abs().t()) * a_s * w_s.reshape(1, -1)
    assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -8 + mags * 2 ** -16).all()
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_M", 0)
    assert rel(out, fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s)) < 5e-3


@pytest.mark.parametrize("m,n,k", [(1, 2048, 5120), (4, 2048, 5120), (1, 4096, 4096)])
def test_fp8_gemv_quantizing_its_input_in_a_cuda_graph(m, n, k, monkeypatch):
    """fp8_gemv.FUSED_ACT: fp8_linear hands o_proj's bf16 rows (GLM-4.7-Flash: K 5120 in 3 chunks; a GLM-4.5-Air-sized
    square one) to the GEMV, which quantizes them itself; inside a CUDA graph the replay with new inputs equals the
    quant launch + e4m3 GEMV to fp32 sum order (same e4m3 operand and scale; H100 run 42: not bit for bit, as 16-bit
    A makes the weight loads 8 bytes a thread and a thread's products add in another order)."""
    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_M", 4)
    _, _, w_q, w_s = per_channel_operands(m, n, k)
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", True)
    assert fp8_gemm._gemv_quantizes(x)
    fp8_gemm.fp8_linear(x, w_q, w_s, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemm.fp8_linear(x, w_q, w_s, None)
    x.copy_(torch.randn(m, k, device=DEV, dtype=BF16) * 7)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", False)
    a_q, a_s = act_quant.quant_fp8_per_token(x)
    assert_sum_order_close(out, fp8_gemm.fp8_linear(x, w_q, w_s, None), a_q, a_s, w_q, w_s)


@pytest.mark.parametrize("m", [1, 4])
def test_fp8_gemv_normalising_its_input_in_a_cuda_graph(m, monkeypatch):
    """fp8_gemv.FUSED_ACT: q_b's GEMV RMS-normalises q_a (GLM-4.7-Flash: 768 columns of the fused q_a + kv_a output,
    read through its 1344-wide rows) and quantizes it itself (ops.rms_norm_fp8_linear, one launch); inside a CUDA graph
    the replay with new inputs equals rms_norm_fp8 + the e4m3 GEMV to fp32 sum order (H100 run 42: not bit for bit at
    M 4, see the A_QUANT test)."""
    from glmserve.kernels.rmsnorm import rms_norm_fp8

    monkeypatch.setattr(fp8_gemm, "GEMV_MAX_M", 4)
    _, _, w_q, w_s = per_channel_operands(m, 5120, 768)
    fused_qkv = torch.randn(m, 1344, device=DEV, dtype=BF16)
    q_a, nw = fused_qkv[:, :768], (torch.rand(768, device=DEV) + 0.5).to(BF16)
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", True)
    fp8_gemm.rms_norm_fp8_linear(q_a, nw, 1e-6, w_q, w_s, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemm.rms_norm_fp8_linear(q_a, nw, 1e-6, w_q, w_s, None)
    fused_qkv.copy_(torch.randn(m, 1344, device=DEV, dtype=BF16) * 3)
    graph.replay()
    torch.cuda.synchronize()
    y, x_fp8 = rms_norm_fp8(q_a, nw, 1e-6)
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", False)
    assert_sum_order_close(out, fp8_gemm.fp8_linear(y, w_q, w_s, None, x_fp8), *x_fp8, w_q, w_s)


@pytest.mark.parametrize("t", [1, 4])
def test_moe_gemv_flash_experts_in_a_cuda_graph(t, monkeypatch):
    """fused_moe.GEMV_MAX_T routes decode's T <= 4 FP8 expert GEMMs (GLM-4.7-Flash: 4 routed + the shared expert
    as slot 4, the slot form the next norm sums) to moe_gemv, PDL-launched inside a CUDA graph: the replay equals
    the eager call with new inputs, and matches the grouped-GEMM path to fp8 activation rounding (one e4m3 step
    of the SiLU-mul output where fp32 sum order moves a value across a rounding boundary) and the fp32 reference;
    with FUSED_ACT (x quantized by the gate_up GEMV, the SiLU-mul formed by the down GEMV) the same to that bound."""
    e, h, i, k = 65, 2048, 1536, 5
    w13 = torch.randn(e, 2 * i, h, device=DEV) * h ** -0.5
    w2 = torch.randn(e, h, i, device=DEV) * i ** -0.5
    s13, s2 = w13.abs().amax(-1, keepdim=True) / 448, w2.abs().amax(-1, keepdim=True) / 448
    w13, w2 = (w13 / s13).to(torch.float8_e4m3fn), (w2 / s2).to(torch.float8_e4m3fn)
    x = torch.randn(t, h, device=DEV, dtype=BF16)
    ids = torch.stack([torch.cat([torch.randperm(e - 1, device=DEV)[: k - 1], torch.tensor([e - 1], device=DEV)])
                       for _ in range(t)])
    weights = torch.rand(t, k, device=DEV)

    def run():
        return fused_moe.fused_experts(x, w13, w2, weights, ids, s13, s2, shared_last=True, keep_slots=True)

    monkeypatch.setattr(fused_moe, "GEMV_MAX_T", 4)
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", False)
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn(t, h, device=DEV, dtype=BF16))
    graph.replay()
    torch.cuda.synchronize()
    assert out.shape == (t, k, h)
    assert torch.equal(out, run())
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", True)  # the down GEMV forms the SiLU-mul, the gate_up one quantizes x
    run()
    with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
        fused = run()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(fused, out) < 1e-2
    monkeypatch.setattr(fp8_gemv, "FUSED_ACT", False)
    monkeypatch.setattr(fused_moe, "GEMV_MAX_T", 0)
    assert rel(out, run()) < 1e-2
    assert rel(out.float().sum(1), fused_moe.fused_experts_ref(x, w13, w2, weights, ids, s13, s2)) < 0.05
