"""Shared by the GPU kernel tests at real GLM shapes (tests/kernels/test_gpu_*.py): operands and checks."""

import torch

from glmserve.kernels import act_quant, fp8_gemm

DEV = "cuda"
BF16 = torch.bfloat16


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_sum_order_close(out, want, a_q, a_s, w_q, w_s) -> None:
    """out and want: the same e4m3 product (a_q [M, K] with a_s [M, 1], w_q [N, K] with w_s [N, 1]) from fp32 sums
    in two orders, each rounded to bf16: apart by at most one bf16 step of |want| (2^-7 of it) plus both sums'
    order errors (<= ~20 roundings of 2^-24 of sum |a w| each, bounded by 2^-16 of it; see the GEMV test)."""
    mags = (a_q.float().abs() @ w_q.float().abs().t()) * a_s * w_s.reshape(1, -1)
    assert ((out.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + mags * 2 ** -15).all()


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [n, k] weight as per-row e4m3: (w_q, w_s [n, 1]) with w ~= w_q * w_s."""
    w = torch.randn(n, k, device=DEV)
    w_s = w.abs().amax(-1, keepdim=True) / 448.0
    return (w / w_s).to(torch.float8_e4m3fn), w_s


def per_channel_operands(m: int, n: int, k: int):
    """(a_q, a_s, w_q, w_s): bf16 activations quantized per token and a per-row e4m3 weight."""
    return (*act_quant.quant_fp8_per_token(torch.randn(m, k, device=DEV, dtype=BF16)), *fp8_weight(n, k))


def gemm_replayed(m: int, n: int, k: int):
    """fp8_gemm on per-channel operands captured in a CUDA graph (compiled outside it), then new activations copied
    in and the graph replayed; asserts the replay equals an eager call on the new inputs. -> (a_q, a_s, w_q, w_s,
    the replay's output)."""
    a_q, a_s, w_q, w_s = per_channel_operands(m, n, k)
    fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s)
    new_q, new_s = act_quant.quant_fp8_per_token(torch.randn(m, k, device=DEV, dtype=BF16))
    a_q.copy_(new_q)
    a_s.copy_(new_s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s))
    return a_q, a_s, w_q, w_s, out
