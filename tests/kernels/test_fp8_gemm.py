"""FP8 GEMMs (per-channel W8A8 and 128x128 block-scaled) vs dequantized fp32 references."""

import pytest
import torch

from glmserve.kernels import _common, fp8_gemm
from glmserve.kernels.act_quant import quant_fp8_group_ref, quant_fp8_per_token_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n, k):
    w = torch.randn(n, k, device=DEV)
    scale = w.abs().amax(-1, keepdim=True) / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("m,n,k,bias", [(7, 45, 67, True), (21, 33, 96, False)])
def test_per_channel(m, n, k, bias):
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(m, k, device=DEV))
    w_q, w_s = _weight(n, k)
    b = torch.randn(n, device=DEV) if bias else None
    out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.float32)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_block_scaled_partial_blocks():
    m, n, k = 5, 140, 200  # partial last 128-block in both N and K
    a_q, a_s = quant_fp8_group_ref(torch.randn(m, k, device=DEV), 128)
    w_q = torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn)
    w_s = torch.rand(2, 2, device=DEV) + 0.5
    out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, None, torch.float32, block=128)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32, block=128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_fp8_linear_close_to_float_linear():
    x = torch.randn(3, 4, 64, device=DEV)
    w_q, w_s = _weight(40, 64)
    y = fp8_gemm.fp8_linear(x, w_q, w_s, None)
    exact = x @ (w_q.float() * w_s).t()
    assert y.shape == (3, 4, 40)
    assert ((y - exact).norm() / exact.norm()).item() < 0.05  # fp8 activation rounding


def test_rejects_wrong_scale_shape():
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(4, 32, device=DEV))
    w_q, w_s = _weight(8, 32)
    with pytest.raises(ValueError):
        fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s.reshape(1, 8), None)


def _gemm_inputs(m: int, n: int, k: int, block: int):
    """(a_q, a_s, w_q, w_s): 1x128-group activations and 128x128-block weight scales when block, else per-token
    activations and per-row weights."""
    if block:
        a_q, a_s = quant_fp8_group_ref(torch.randn(m, k, device=DEV), 128)
        w_s = torch.rand(-(-n // 128), -(-k // 128), device=DEV) + 0.5
        return a_q, a_s, torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn), w_s
    return (*quant_fp8_per_token_ref(torch.randn(m, k, device=DEV)), *_weight(n, k))


@pytest.mark.parametrize("block,bias", [(0, True), (128, False)])
def test_split_k_matches_reference(block, bias):
    m, n, k = 3, 37, 300  # K spans 3 blocks of 128 (and 10 of the CPU config's 32)
    a_q, a_s, w_q, w_s = _gemm_inputs(m, n, k, block)
    b = torch.randn(n, device=DEV) if bias else None
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32, block=block)
    for split in (2, 3):
        out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.float32, block=block, split_k=split)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block", [0, 128])
def test_split_k_inline_reduce_matches_reduce_kernel(block, monkeypatch):
    """SPLITK_INLINE: the tile's last split sums the partials in split order, as _splitk_reduce_kernel does
    (same bits), and leaves every arrival counter at 0 for the next launch (twice: a reused counter)."""
    m, n, k = 5, 70, 384  # several N tiles (the CPU config's BLOCK_N 32), 12 K blocks of 32
    a_q, a_s, w_q, w_s = _gemm_inputs(m, n, k, block)
    b = torch.randn(n, device=DEV)
    monkeypatch.setattr(_common, "_arrival", {})
    for split in (3, 4):
        monkeypatch.setattr(fp8_gemm, "SPLITK_INLINE", False)
        want = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.float32, block=block, split_k=split)
        monkeypatch.setattr(fp8_gemm, "SPLITK_INLINE", True)
        for _ in range(2):
            got = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.float32, block=block, split_k=split)
            assert torch.equal(got, want)
        counters = _common._arrival[a_q.device]
        assert counters.numel() == _common.ARRIVAL_COUNTERS and not counters.any()


@pytest.mark.parametrize("block,bias,split", [(0, True, 1), (0, False, 1), (0, True, 3), (128, True, 1)])
def test_early_scales_give_the_same_bits(block, bias, split, monkeypatch):
    """fp8_gemm.EARLY_SCALES (the epilogue's scales and bias loaded before the K loop) only moves loads: the same
    bits, alone, with inline split-K, and block-scaled (where only the bias moves)."""
    m, n, k = 6, 70, 300
    a_q, a_s, w_q, w_s = _gemm_inputs(m, n, k, block)
    b = torch.randn(n, device=DEV) if bias else None
    monkeypatch.setattr(fp8_gemm, "SPLITK_INLINE", True)
    out = {}
    for early in (False, True):
        monkeypatch.setattr(fp8_gemm, "EARLY_SCALES", early)
        out[early] = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.float32, block=block, split_k=split)
    assert torch.equal(out[True], out[False])
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32, block=block)
    torch.testing.assert_close(out[True], ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("precise", [True, False])
def test_tma_kernel_partial_tiles(precise):
    """kernels/fp8_gemm_tma.py (the M > 512 Hopper path) on tiles cut by M, N and K (zero-filled by TMA)."""
    from glmserve.kernels.fp8_gemm_tma import fp8_gemm_tma, tma_ok

    m, n, k = 37, 45, 80  # K = 2.5 blocks of 32
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(m, k, device=DEV))
    w_q, w_s = _weight(n, k)
    b = torch.randn(n, device=DEV)
    assert tma_ok(a_q, w_q)
    out = torch.full((m, n), float("nan"), device=DEV)
    fp8_gemm_tma(a_q, a_s, w_q, w_s, b, out, (16, 32, 32, 2, 4, 1), precise)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch._scaled_mm rowwise, sm_90)")
@pytest.mark.parametrize("m", [1, 64, 256])
def test_scaled_mm_window_matches_reference(m, monkeypatch):
    """SCALED_MM_M routes per-channel GEMMs in its M window to torch._scaled_mm; bf16 out, bias added after."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("rowwise _scaled_mm needs sm_90")
    monkeypatch.setattr(fp8_gemm, "SCALED_MM_M", (1, 512))
    n, k = 1344, 2048
    a_q, a_s = quant_fp8_per_token_ref(torch.randn(m, k, device=DEV))
    w_q, w_s = _weight(n, k)
    b = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    ref = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, b, torch.float32)
    assert fp8_gemm._use_scaled_mm(a_q, m, n, k, 0, torch.bfloat16)
    out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, b, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # Error model: the FP8 MMA accumulates in fewer bits than fp32 between promotions (~14 mantissa bits on
    # Hopper), so the sum's error scales with sum_k |a w|, not with |y|: a fixed atol 2e-2 failed 2 of 344k
    # elements with |ref| < 0.25 on H100 run 36, the worst 2^-15.7 of sum_k |a w|. Then two bf16 roundings
    # (half an ulp, <= 2^-8 of the value each): of y and of y + bias.
    mag = (a_q.float().abs() @ w_q.float().abs().t()) * a_s * w_s.reshape(1, -1)
    y = fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32)
    bound = mag * 2.0**-13 + (y.abs() + ref.abs()) * 2.0**-8
    err = (out.float() - ref).abs()
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements off, worst {float((err - bound).max()):.4g}"
    assert float((b.float().abs() > bound).float().mean()) > 0.5  # the bound is tight enough to see a lost bias
    monkeypatch.setattr(fp8_gemm, "SCALED_MM_M", None)
    assert not fp8_gemm._use_scaled_mm(a_q, m, n, k, 0, torch.bfloat16)


def test_tma_mid_rule(monkeypatch):
    """With TMA_MID_M set, decode batches of 65-512 rows take the TMA kernel only for K >= TMA_MID_MIN_K (q_b's
    K 768 stays on the pointer kernel: slower on TMA, H100 run 29); TMA_MID_M None never."""
    from glmserve.kernels import fp8_gemm

    assert fp8_gemm.TMA_MID_M == fp8_gemm.TMA_MID_ON  # the default (H100 run 30)
    monkeypatch.setattr(fp8_gemm, "TMA_MID_M", None)
    assert not fp8_gemm._tma_mid(256, 5120)
    monkeypatch.setattr(fp8_gemm, "TMA_MID_M", fp8_gemm.TMA_MID_ON)
    assert fp8_gemm._tma_mid(256, 5120) and fp8_gemm._tma_mid(65, 2048) and fp8_gemm._tma_mid(512, 2048)
    assert not fp8_gemm._tma_mid(64, 5120) and not fp8_gemm._tma_mid(513, 5120) and not fp8_gemm._tma_mid(256, 768)
    assert fp8_gemm.tma_config(None, 256, 2048, True, 5120) == fp8_gemm.TMA_CONFIGS["mid"]
