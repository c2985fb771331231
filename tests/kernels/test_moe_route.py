"""MoE router kernel vs spec §1.2 reference; sort/align invariants."""

import pytest
import torch

from glmserve.kernels.moe_route import moe_align, moe_route
from glmserve.shared.model.ops import moe_route_ref
from tests.kernels.norm_checks import assert_norm_outputs_match, forbid_norm_launches

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sorted(w, ids):
    order = ids.argsort(-1)
    return w.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k,n_group,topk_group,norm,scale", [(13, 3, 1, 1, True, 2.5), (24, 4, 4, 2, True, 1.8), (9, 2, 1, 1, False, 1.0)])
def test_route_matches_reference(e, k, n_group, topk_group, norm, scale, gate_dtype):
    """gate bf16 (as Router.after_load keeps an exactly-bf16 checkpoint gate): on CUDA the logits come from
    one bf16 GEMM with fp32 output, which must pick the experts the fp32 reference picks."""
    h = torch.randn(19, 72, device=DEV).to(torch.bfloat16)
    gate = torch.randn(e, 72, device=DEV).to(torch.bfloat16).to(gate_dtype)
    bias = torch.randn(e, device=DEV) * 0.5
    w, ids = moe_route(h, gate, bias, k, n_group, topk_group, norm, scale)
    w_ref, ids_ref = moe_route_ref(h, gate.float(), bias, k, n_group, topk_group, norm, scale)
    w, ids = _sorted(w, ids)
    w_ref, ids_ref = _sorted(w_ref, ids_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_fused_router_gemm_equals_logits_then_route(monkeypatch):
    """The one-launch router (its GEMM in the routing kernel; off by default, measured slower; BLOCK_T = 16 tokens
    a program: 37 tokens span three programs, the last partial) picks what router_logits + _route_kernel pick,
    with the same weights."""
    from glmserve.kernels import moe_route as mr

    g = torch.Generator().manual_seed(5)
    h = torch.randn(37, 256, generator=g).to(DEV, torch.bfloat16)
    gate = (torch.randn(64, 256, generator=g) / 16).to(DEV, torch.bfloat16)
    bias = (torch.randn(64, generator=g) * 0.1).to(DEV)
    monkeypatch.setattr(mr, "FUSED_GEMM", True)
    fused = mr.moe_route(h, gate, bias, 4, 1, 1, True, 2.5, True)
    monkeypatch.setattr(mr, "FUSED_GEMM", False)
    unfused = mr.moe_route(h, gate, bias, 4, 1, 1, True, 2.5, True)
    assert torch.equal(fused[1], unfused[1])
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(fused[1][:, -1], torch.full((37,), 64, device=DEV))  # the shared slot, last


def test_router_logits_bf16_gemm_matches_fp32():
    """router_logits: the bf16-in, fp32-out GEMM (CUDA) equals the fp32 GEMM of the same values to fp32
    rounding -- the products are exact; only the summation order differs."""
    from glmserve.kernels.moe_route import router_logits

    x = torch.randn(256, 2048, device=DEV).to(torch.bfloat16)
    gate = (torch.randn(64, 2048, device=DEV) / 2048 ** 0.5).to(torch.bfloat16)
    got = router_logits(x, gate)
    assert got.dtype == torch.float32
    ref = x.double() @ gate.double().t()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=5e-5)  # H100 run 31: 1.3e-5 on 1 of 16,384 (|ref| ~ 4)


def test_bias_only_selects():
    h = torch.randn(4, 8, device=DEV)
    gate = torch.randn(6, 8, device=DEV)
    bias = torch.tensor([0.0, 0, 0, 0, 0, 10.0], device=DEV)  # expert 5 always picked
    w, ids = moe_route(h, gate, bias, 2, 1, 1, False, 1.0)
    assert (ids == 5).any(-1).all()
    scores = (h @ gate.t()).sigmoid()
    torch.testing.assert_close(w, scores.gather(1, ids))  # weights from unbiased scores


def test_align_groups_pairs_by_expert():
    ids = torch.randint(0, 5, (9, 3), device=DEV)
    sorted_pairs, block_expert = moe_align(ids, 5, 4)
    flat = ids.reshape(-1)
    real = sorted_pairs[sorted_pairs < flat.numel()].long()
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each pair exactly once
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * 4:(b + 1) * 4].long()
        rows = rows[rows < flat.numel()]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows] == e).all()


@pytest.mark.parametrize("t,k,e,block_m", [(9, 3, 5, 4), (37, 4, 13, 16), (1, 8, 40, 16), (256, 4, 64, 16),
                                               (300, 4, 64, 16)])  # 1,200 pairs: two chunks
def test_one_launch_align_equals_torch_align(t, k, e, block_m):
    from glmserve.kernels.moe_align import moe_align as moe_align_kernel

    ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    pairs, blocks = moe_align_kernel(ids, e, block_m)
    pairs_ref, blocks_ref = moe_align(ids, e, block_m)
    assert torch.equal(pairs, pairs_ref)
    assert torch.equal(blocks, blocks_ref)


@pytest.mark.parametrize("e,k,n_group,topk_group", [(13, 3, 1, 1), (24, 4, 4, 2)])
def test_route_shared_slot(e, k, n_group, topk_group):
    """shared_slot appends slot k: id E, weight 1 (the fused shared expert), the first k slots unchanged."""
    h = torch.randn(7, 20, device=DEV)
    gate = torch.randn(e, 20, device=DEV)
    bias = torch.randn(e, device=DEV) * 0.5
    w0, ids0 = moe_route(h, gate, bias, k, n_group, topk_group, True, 2.5)
    for fn in (moe_route, moe_route_ref):
        w, ids = fn(h, gate, bias, k, n_group, topk_group, True, 2.5, True)
        assert w.shape == ids.shape == (7, k + 1)
        assert (ids[:, k] == e).all() and (w[:, k] == 1.0).all()
        a, b = _sorted(w[:, :k], ids[:, :k]), _sorted(w0, ids0)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,k,e,block_m", [(9, 3, 5, 4), (37, 4, 13, 16), (1, 8, 40, 16), (70, 4, 64, 16),
                                           (256, 4, 64, 16)])  # 1,280 pairs: two chunks
def test_one_launch_align_dense_last_equals_torch_align(t, k, e, block_m):
    """dense_last (the fused shared expert, id e, every token's last slot): same output as sorting it."""
    from glmserve.kernels.moe_align import moe_align as moe_align_kernel

    routed = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    ids = torch.cat([routed, torch.full((t, 1), e, device=DEV, dtype=routed.dtype)], dim=1)
    pairs, blocks = moe_align_kernel(ids, e + 1, block_m, dense_last=True)
    pairs_ref, blocks_ref = moe_align(ids, e + 1, block_m)
    assert torch.equal(pairs, pairs_ref)
    assert torch.equal(blocks, blocks_ref)


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32])
def test_router_keeps_gate_bf16_only_when_exact(tmp_path, ckpt_dtype):
    """Router.after_load: a bf16 checkpoint's gate is held bf16 (its values, read as fp32, unchanged); an
    fp32 checkpoint's gate (not bf16-representable) stays fp32."""
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe", seed=2, dtype=ckpt_dtype, num_nextn_predict_layers=0)
    runner = ModelRunner(path, dtype=torch.float32, with_mtp=False)
    gate = runner.model.model.layers[1].mlp.gate.weight
    assert gate.dtype == ckpt_dtype


@pytest.mark.parametrize("t,e,k,n_group,topk_group,shared,h", [
    (1, 64, 4, 1, 1, True, 256),  # GLM-4.7-Flash's router at batch 1 (2 K splits)
    (5, 24, 4, 4, 2, True, 96),  # groups; H not a multiple of BLOCK_K (the last K block masked)
    (16, 40, 8, 1, 1, False, 160),  # MAX_T tokens, no shared slot
    (3, 160, 8, 1, 1, True, 256),  # GLM-4.5's 160 experts: BLOCK_E 256, BLOCK_S 256, 8 K splits
])
@pytest.mark.parametrize("relaxed", [False, True])
def test_route_align_one_launch_equals_route_then_align(t, e, k, n_group, topk_group, shared, h, relaxed,
                                                        monkeypatch):
    """moe_route_align's one launch (split-K logits, last program selects and aligns) gives moe_route's weights
    and ids and moe_align's layout for fused_experts' BLOCK_M, twice in a row (the arrival counter reset, acq_rel
    or relaxed: RELAXED_RESET)."""
    from glmserve.kernels import _common, fused_moe, moe_route_align as ra
    from glmserve.kernels.moe_route_align import moe_route_align

    monkeypatch.setattr(ra, "RELAXED_RESET", relaxed)

    g = torch.Generator().manual_seed(t * 1000 + e)
    x = torch.randn(t, h, generator=g).to(DEV, torch.bfloat16)
    gate = (torch.randn(e, h, generator=g) / h ** 0.5).to(DEV, torch.bfloat16)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEV)
    slots = e + int(shared)
    w_ref, ids_ref = moe_route(x, gate, bias, k, n_group, topk_group, True, 2.5, shared)
    block_m = fused_moe.expert_block_m(x.device, ids_ref.numel(), slots, True)
    pairs_ref, blocks_ref = moe_align(ids_ref, slots, block_m)
    for _ in range(2):
        w, ids, aligned = moe_route_align(x, gate, bias, k, n_group, topk_group, True, 2.5, shared, slots, True)
        assert aligned is not None and aligned[2] == block_m
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(aligned[0], pairs_ref)
        assert torch.equal(aligned[1], blocks_ref)
        assert not _common._arrival[x.device].any()


def test_route_align_without_alignment_selects_the_same_experts():
    """align=False (the tokens go to fused_experts' GEMV path, which reads the ids): the same weights and ids as the
    aligning launch, no layout, and the arrival counter back at 0 for the next launch."""
    from glmserve.kernels import _common
    from glmserve.kernels.moe_route_align import moe_route_align

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=g).to(DEV, torch.bfloat16)
    gate = (torch.randn(16, 256, generator=g) / 16).to(DEV, torch.bfloat16)
    bias = (torch.randn(16, generator=g) * 0.1).to(DEV)
    w, ids, aligned = moe_route_align(x, gate, bias, 4, 4, 2, True, 2.5, True, 17, True, align=True)
    for _ in range(2):
        w2, ids2, none = moe_route_align(x, gate, bias, 4, 4, 2, True, 2.5, True, 17, True, align=False)
        assert aligned is not None and none is None
        assert torch.equal(ids2, ids) and torch.equal(w2, w)
        assert not _common._arrival[x.device].any()


def test_route_align_falls_back_where_one_launch_does_not_apply():
    """More than MAX_T tokens, or an fp32 gate: moe_route's outputs and no alignment (fused_experts aligns)."""
    from glmserve.kernels.moe_route_align import MAX_T, moe_route_align

    x = torch.randn(MAX_T + 1, 64, device=DEV).to(torch.bfloat16)
    for xs, gate in ((x, torch.randn(8, 64, device=DEV).to(torch.bfloat16)), (x[:2], torch.randn(8, 64, device=DEV))):
        bias = torch.zeros(8, device=DEV)
        w, ids, aligned = moe_route_align(xs, gate, bias, 2, 1, 1, True, 1.0, True, 9, False)
        w_ref, ids_ref = moe_route(xs, gate, bias, 2, 1, 1, True, 1.0, True)
        assert aligned is None and torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


@pytest.mark.parametrize("t,e,k,h,quant,shared", [
    (1, 64, 4, 256, True, True),  # GLM-4.7-Flash's router at batch 1 (2 K splits), FP8 experts
    (3, 24, 4, 96, False, True),  # SEL_T 4 rows for 3 tokens; H not a power of two (masked row tails, K block)
    (4, 40, 8, 160, True, False),  # NORM_MAX_T tokens, no shared slot
])
def test_norm_in_route_align_equals_norm_then_route(t, e, k, h, quant, shared, monkeypatch):
    """add_rms_norm_route_align's one launch (NORM_IN: every program normalises x + residual itself, program 0
    stores the norm's outputs) against its two-launch form (NORM_MAX_T 0: add_rms_norm(_fp8), then
    moe_route_align): s bit-equal; y, y's FP8 form and the routing weights equal to fp32 sum order (bit-equal under
    the interpreter); the same experts and layout; the arrival counter back at 0, twice in a row."""
    from glmserve.kernels import _common, moe_route_align as ra

    g = torch.Generator().manual_seed(t * 100 + h)
    x = (torch.randn(t, h, generator=g) * 3).to(DEV, torch.bfloat16)
    res = torch.randn(t, h, generator=g).to(DEV, torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(h, generator=g)).to(DEV, torch.bfloat16)
    gate = (torch.randn(e, h, generator=g) / h ** 0.5).to(DEV, torch.bfloat16)
    bias = (torch.randn(e, generator=g) * 0.1).to(DEV)
    args = (x, res, nw, 1e-5, quant, gate, bias, k, 1, 1, True, 2.5, shared, e + int(shared), True)
    monkeypatch.setattr(ra, "NORM_MAX_T", 0)
    want = ra.add_rms_norm_route_align(*args)
    monkeypatch.setattr(ra, "NORM_MAX_T", 4)
    forbid_norm_launches(monkeypatch)
    for _ in range(2):
        got = ra.add_rms_norm_route_align(*args)
        assert_norm_outputs_match(got[:3], want[:3], exact=DEV == "cpu")
        assert torch.equal(got[4], want[4])  # ids
        assert torch.equal(got[3], want[3]) if DEV == "cpu" else torch.allclose(got[3], want[3], rtol=8e-3, atol=1e-5)
        assert (got[5] is None) == (want[5] is None)
        if got[5] is not None:
            assert all(torch.equal(a, b) for a, b in zip(got[5][:2], want[5][:2])) and got[5][2] == want[5][2]
        assert not _common._arrival[x.device].any()


def test_norm_in_route_align_falls_back_beyond_its_rows(monkeypatch):
    """More tokens than NORM_MAX_T, or rows wider than NORM_MAX_ELEMS allows: the norm's own launch, then the
    router's (the same results as calling them one after another)."""
    from glmserve.kernels import moe_route_align as ra, rmsnorm

    monkeypatch.setattr(ra, "NORM_MAX_T", 4)
    calls = []
    real = rmsnorm.add_rms_norm_fp8
    monkeypatch.setattr(rmsnorm, "add_rms_norm_fp8", lambda *a: calls.append(1) or real(*a))
    for t, h in ((5, 64), (1, ra.NORM_MAX_ELEMS * 2)):
        x, res = torch.randn(2, t, h, device=DEV).to(torch.bfloat16)
        nw = torch.ones(h, device=DEV, dtype=torch.bfloat16)
        gate = torch.randn(8, h, device=DEV).to(torch.bfloat16) / h ** 0.5
        bias = torch.zeros(8, device=DEV)
        y, s, y_fp8, w, ids, _ = ra.add_rms_norm_route_align(x, res, nw, 1e-6, True, gate, bias, 2, 1, 1, True, 1.0,
                                                              True, 9, True)
        y_ref, s_ref, _ = real(x, res, nw, 1e-6)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref) and y_fp8 is not None
        assert torch.equal(ids, ra.moe_route_align(y_ref, gate, bias, 2, 1, 1, True, 1.0, True, 9, True)[1])
    assert len(calls) == 2


def test_moe_layer_uses_the_routers_alignment(tmp_path, monkeypatch):
    """MoE.forward with the kernels (bf16, 3 tokens): the experts take the router's sorted pairs (moe_align is not
    called) and give the same bits as the route-then-align path (moe_route_align.ENABLED off)."""
    from glmserve.kernels import backend, fused_moe, moe_route_align
    from glmserve.shared.config.model import ModelConfig
    from glmserve.shared.model import ops
    from glmserve.shared.model.context import BuildCtx
    from glmserve.shared.model.layers.moe import MoE
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    cfg = ModelConfig.from_dir(write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", num_nextn_predict_layers=0))
    moe = MoE(cfg, BuildCtx(dtype=torch.bfloat16, device=DEV), "model.layers.1.mlp")
    g = torch.Generator().manual_seed(0)
    for p in (moe.experts.w13, moe.experts.w2):
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    moe.gate.weight.data.copy_((torch.randn(moe.gate.weight.shape, generator=g) * 0.2).to(torch.bfloat16))
    moe.gate.after_load()  # bf16-exact values: the gate is held bf16, as a GLM checkpoint's
    assert moe.gate.weight.dtype == torch.bfloat16 and moe.shared_experts is None  # shared expert fused
    x = torch.randn(3, cfg.hidden_size, generator=g).to(DEV, torch.bfloat16)
    kernels = backend._kernels()
    for name in ("moe_route_align", "fused_experts"):
        monkeypatch.setitem(ops.IMPL, name, kernels[name])

    def no_align(*_):
        raise AssertionError("fused_experts aligned the pairs again")

    with monkeypatch.context() as m:
        m.setattr(fused_moe, "moe_align", no_align)
        one_launch = moe(x)
    monkeypatch.setattr(moe_route_align, "ENABLED", False)
    assert torch.equal(one_launch, moe(x))
