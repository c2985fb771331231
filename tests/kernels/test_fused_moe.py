"""Fused expert MLP (BF16/fp32 and FP8 per-channel) vs the per-expert torch loop."""

import pytest
import torch

from glmserve.kernels.fused_moe import fused_experts, fused_experts_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype):
    """fp32: full-precision dots (dot_precision "ieee") in the interpreter and compiled; bf16: a few bf16 steps."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=3e-2, atol=3e-2)


def _inputs(t, h, i, e, k, dtype):
    x = torch.randn(t, h, device=DEV).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=DEV) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=DEV) / i ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    weights = torch.rand(t, k, device=DEV)
    return x, w13, w2, weights, ids


def _fp8(w13, w2):
    """Per-row e4m3 experts: (q13, q2, s13 [E, 2I, 1], s2 [E, H, 1]) with w ~= q * s."""
    s13, s2 = w13.abs().amax(-1, keepdim=True) / 448.0, w2.abs().amax(-1, keepdim=True) / 448.0
    return (w13 / s13).to(torch.float8_e4m3fn), (w2 / s2).to(torch.float8_e4m3fn), s13, s2


@pytest.mark.parametrize("t,dtype", [(5, torch.float32), (19, torch.bfloat16)])
def test_fused_experts_dense_dtypes(t, dtype):
    x, w13, w2, weights, ids = _inputs(t, 40, 24, 6, 3, dtype)
    out = fused_experts(x, w13, w2, weights, ids)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert not torch.isnan(out).any()
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_fused_experts_fp8_per_channel():
    """Activations are fp8-quantized in the kernel (x, then the SiLU-mul output), not in the reference: e4m3
    rounds each value by up to 1/16 of itself. Over 30 seeds on CPU the error was 0.041 on average, 0.055 at
    most; unseeded it once reached 0.064 on an H100 (run 32), so the inputs are seeded and the bound is 0.08."""
    torch.manual_seed(0)
    x, w13, w2, weights, ids = _inputs(7, 48, 20, 5, 2, torch.float32)
    q13, q2, s13, s2 = _fp8(w13, w2)
    out = fused_experts(x, q13, q2, weights, ids, s13, s2)
    ref = fused_experts_ref(x, q13, q2, weights, ids, s13, s2)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.08, rel


def test_fused_experts_fp8_matches_quantized_activation_reference():
    """W8A8 exactly as the kernels quantize: x per token, the SiLU-mul output per pair."""
    from glmserve.kernels.act_quant import quant_fp8_per_token_ref, silu_and_mul_ref

    x, w13, w2, weights, ids = _inputs(6, 32, 80, 4, 2, torch.float32)
    q13, q2, s13, s2 = _fp8(w13, w2)
    out = fused_experts(x, q13, q2, weights, ids, s13, s2)
    xq, xs = quant_fp8_per_token_ref(x)
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            gu = (xq[t].float() @ q13[e].float().t()) * xs[t] * s13[e, :, 0]
            aq, a_s = quant_fp8_per_token_ref(silu_and_mul_ref(gu[None]))
            ref[t] += weights[t, j] * (((aq[0].float() * a_s[0]) @ q2[e].float().t()) * s2[e, :, 0])
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-3)  # one fp8 step on a few activations


@pytest.mark.parametrize("fp8,dtype", [(True, torch.bfloat16), (False, torch.bfloat16), (False, torch.float32)])
def test_early_loads_give_the_same_bits(fp8, dtype, monkeypatch):
    """fused_moe.EARLY_LOADS (pairs beside the expert id, epilogue scales / weights before the K loop) only moves
    loads: the same output bit for bit, FP8 and float experts, a fused-shared-style dense last slot included."""
    from glmserve.kernels import fused_moe

    torch.manual_seed(3)
    x, w13, w2, weights, ids = _inputs(7, 48, 40, 6, 3, torch.float32)
    ids[:, -1] = 5  # every token's last slot on one expert: a block with several pairs
    x = x.to(dtype)
    scales = ()
    if fp8:
        w13, w2, *scales = _fp8(w13, w2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    out = {}
    for early in (False, True):
        monkeypatch.setattr(fused_moe, "EARLY_LOADS", early)
        out[early] = fused_experts(x, w13, w2, weights, ids, *scales)
    assert torch.equal(out[True], out[False])
    ref = fused_experts_ref(x, w13, w2, weights, ids, *scales)
    assert ((out[True].float() - ref.float()).norm() / ref.float().norm()).item() < (0.08 if fp8 else 0.02)


def test_launch_config_fits_shared_memory_for_fp32():
    """The GPU config table is sized for bf16/fp8 operands; fp32 models (tests, the tiny CPU-sized
    checkpoints on CUDA) must get stages/BLOCK_K cut so the tiles fit sm_90's shared memory."""
    from glmserve.kernels import fused_moe

    def smem(c, nbytes):
        return c[4] * (c[0] * c[2] + c[2] * c[1]) * nbytes

    for cfg in fused_moe.CONFIGS.values():
        wide = (64, *cfg[1:])  # BLOCK_M grows to 64 at decode
        fit = fused_moe._fit_smem(wide, 4)
        assert smem(fit, 4) <= fused_moe._SMEM_BUDGET and fit[2] >= 16 and fit[4] >= 2 and fit[:2] == wide[:2]
        assert fused_moe._fit_smem(cfg, 1) == cfg  # fp8 configs untouched
    failed_on_h200 = (64, *fused_moe.CONFIGS[("default", "decode", "bf16")][1:])  # 256 KB of tiles in fp32
    assert smem(failed_on_h200, 4) > fused_moe._SMEM_BUDGET >= smem(fused_moe._fit_smem(failed_on_h200, 4), 4)


def test_decode_blocks_fill_the_gpu():
    """Few active experts (decode): BLOCK_N halves until the working blocks fill every SM twice, never
    below 32; many active experts (prefill, large batches) keep the table's BLOCK_N."""
    from glmserve.kernels.fused_moe import MIN_BLOCK_N, _narrow_n

    assert _narrow_n(128, 2048, active_m=4, sms=132) == MIN_BLOCK_N == 32  # w2 at batch 1: 64 -> 256 programs
    assert _narrow_n(128, 3072, active_m=4, sms=132) == 32  # w13: 96 -> 384
    assert _narrow_n(128, 3072, active_m=8, sms=132) == 64  # 8 experts: 192 -> 384
    assert _narrow_n(128, 3072, active_m=64, sms=132) == 128  # 1536 programs already
    from glmserve.kernels.fused_moe import NARROW_FLOOR

    assert _narrow_n(64, 3072, active_m=5, sms=132, floor=NARROW_FLOOR["H100"]) == 64  # H100: 64 beat 32 (run 17)


@pytest.mark.parametrize("fp8", [False, True])
def test_keep_slots_returns_the_rows_the_sum_would_add(fp8):
    """keep_slots=True (TP 1: the next add_rms_norm sums the slots): [T, k, H] whose fp32 sum rounded once is
    exactly the summed output; the reference's slot form agrees with its own sum and with the kernel's."""
    from glmserve.shared.model import ops

    x, w13, w2, weights, ids = _inputs(7, 48, 20, 5, 3, torch.float32)
    scales = ()
    if fp8:
        w13, w2, *scales = _fp8(w13, w2)
    out = fused_experts(x, w13, w2, weights, ids, *scales)
    slots = fused_experts(x, w13, w2, weights, ids, *scales, keep_slots=True)
    assert slots.shape == (7, 3, 48)
    assert torch.equal(slots.float().sum(1).to(out.dtype), out)
    ref_sum = ops.fused_experts_ref(x, w13, w2, weights, ids, *(scales or (None, None)))
    ref_slots = ops.fused_experts_ref(x, w13, w2, weights, ids, *(scales or (None, None)), keep_slots=True)
    assert ref_slots.shape == (7, 3, 48)
    torch.testing.assert_close(ref_slots.sum(1), ref_sum, rtol=1e-5, atol=1e-5)
    if not fp8:  # W8A8 quantizes activations, the reference does not
        torch.testing.assert_close(slots, ref_slots, rtol=1e-4, atol=1e-4)
    # a slot row is its pair's weighted expert output: the last slot alone, through the reference
    one = ops.fused_experts_ref(x, w13, w2, weights[:, 2:], ids[:, 2:], *(scales or (None, None)))
    torch.testing.assert_close(ref_slots[:, 2], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [4, 16])
def test_grid_covers_every_block_with_pairs(block_m):
    """fused_moe.used_blocks bounds the grid's expert blocks: every block moe_align gives pairs lies below it,
    for adversarial counts (each active expert's run one pair past a whole block, the most padding) and random
    decode routings; at batch 1 it is the 5 blocks that hold pairs, not all 62."""
    from glmserve.kernels.fused_moe import used_blocks
    from glmserve.kernels.moe_route import moe_align

    gen = torch.Generator().manual_seed(0)
    cases = []
    for e in (5, 13, 65):
        for active in (1, 3, e):
            counts = [block_m * int(torch.randint(0, 3, (1,), generator=gen)) + 1 for _ in range(active)]
            cases.append((torch.cat([torch.full((c, 1), x) for x, c in enumerate(counts)]), e))
        for t in (1, 3, 40):
            cases.append((torch.stack([torch.randperm(e, generator=gen)[:4] for _ in range(t)]), e))
    for ids, e in cases:
        _, block_expert = moe_align(ids.to(DEV), e, block_m)
        n = used_blocks(block_expert.numel(), ids.numel(), block_m, e)
        assert n <= block_expert.numel() and (block_expert[n:] == -1).all()
        assert (block_expert[:n] >= 0).sum() == (block_expert >= 0).sum()
    assert used_blocks(62, 5, 16, 65) == 5
