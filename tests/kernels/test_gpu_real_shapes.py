"""Kernels at real GLM-4.5-Air (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite) shapes, TP=1, on CUDA only.

Run on the device: `pytest -q -m gpu tests/kernels` (bench/gpu_kernels.sh). Compiled kernels round like
torch, so bf16 tolerances are tight-ish; fp8 outputs are compared to dequantized references.
"""

import pytest
import torch

from glmserve.kernels import (_common, act_quant, fp8_gemm, fused_moe, kv_pages, mla_absorb, moe_route, paged_attention,
                              rmsnorm, rope)
from glmserve.shared.model import ops
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from tests.kernels.gpu_shapes import BF16, DEV, fp8_weight, per_channel_operands, rel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("t,h", [(1, 4096), (777, 4096), (513, 2048), (64, 5120)])
def test_norms(t, h):
    x, r = (torch.randn(t, h, device=DEV, dtype=BF16) for _ in range(2))
    w = torch.randn(h, device=DEV, dtype=BF16)  # the norm weight is [h]
    torch.testing.assert_close(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5), rtol=1e-2, atol=1e-2)
    y, s = rmsnorm.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = rmsnorm.add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("hq,hk,d,rd,inter", [(96, 8, 128, 64, False), (20, 1, 64, 64, True)])
def test_rope(hq, hk, d, rd, inter):
    t = 1000
    q, k = torch.randn(t, hq, d, device=DEV, dtype=BF16), torch.randn(t, hk, d, device=DEV, dtype=BF16)
    pos = torch.randint(0, 131072, (t,), device=DEV)
    cos, sin = rope.cos_sin_cache(rd, 131072, 1e6, DEV)
    q_ref = ops.rope_ref(q.float(), cos[pos], sin[pos], rd, inter)
    k_ref = ops.rope_ref(k.float(), cos[pos], sin[pos], rd, inter)
    rope.rope_inplace(q, k, pos, cos, sin, rd, inter)
    torch.testing.assert_close(q.float(), q_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(k.float(), k_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("t,i", [(300, 1408), (37, 10944), (256, 1536)])
def test_silu_mul_fp8(t, i):
    x = torch.randn(t, 2 * i, device=DEV, dtype=BF16)
    torch.testing.assert_close(act_quant.silu_and_mul(x), act_quant.silu_and_mul_ref(x), rtol=1e-2, atol=1e-2)
    q, s = act_quant.silu_and_mul_fp8(x)
    q_ref, s_ref = act_quant.silu_and_mul_fp8_ref(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-2, atol=0)  # the row max may differ by one bf16 step
    assert rel(q, q_ref) < 0.02


@pytest.mark.parametrize("m,n,k", [(1, 12288, 4096), (64, 4096, 12288), (2048, 3072, 2048), (333, 2816, 4096)])
def test_fp8_gemm_per_channel(m, n, k):
    a_q, a_s, w_q, w_s = per_channel_operands(m, n, k)
    bias = torch.randn(n, device=DEV, dtype=BF16)
    out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, bias)
    assert rel(out, fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, bias, torch.float32)) < 5e-3


def test_fp8_gemm_block_scaled():
    m, n, k = 2048, 4096, 4096
    a_q, a_s = act_quant.quant_fp8_group(torch.randn(m, k, device=DEV, dtype=BF16), 128)
    w_q = torch.randn(n, k, device=DEV).to(torch.float8_e4m3fn)
    w_s = torch.rand(n // 128, k // 128, device=DEV) + 0.5
    out = fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, None, block=128)
    assert rel(out, fp8_gemm.fp8_gemm_ref(a_q, a_s, w_q, w_s, None, torch.float32, block=128)) < 5e-3


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t", [1, 512])
@pytest.mark.parametrize("e,k,h,scale", [(128, 8, 4096, 1.0), (64, 4, 2048, 1.8), (160, 8, 5120, 2.5)])
def test_router(e, k, h, scale, t, fused, monkeypatch):
    """bf16 x and gate: cuBLAS logits + the routing kernel, or the router GEMM inside it (moe_route.FUSED_GEMM)."""
    monkeypatch.setattr(moe_route, "FUSED_GEMM", fused)
    x = torch.randn(t, h, device=DEV, dtype=BF16)
    gate = torch.randn(e, h, device=DEV, dtype=BF16) * 0.02
    bias = torch.randn(e, device=DEV) * 0.01
    w, ids = moe_route.moe_route(x, gate, bias, k, 1, 1, True, scale)
    w_ref, ids_ref = ops.moe_route_ref(x, gate, bias, k, 1, 1, True, scale)
    o, o_ref = ids.argsort(-1), ids_ref.argsort(-1)
    assert torch.equal(ids.gather(1, o), ids_ref.gather(1, o_ref))
    torch.testing.assert_close(w.gather(1, o), w_ref.gather(1, o_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 3, 256, 1000])
@pytest.mark.parametrize("fp8", [True, False])
def test_mla_absorb_flash(t, fp8):
    """GLM-4.7-Flash's absorbed up-projections (20 heads, nope 192, v 256, L 512) in the MLA layer's layouts."""
    h, nope, v, lora, rope_dim = 20, 192, 256, 512, 64
    w = torch.randn(h * (nope + v), lora, device=DEV) / lora ** 0.5
    scale = w.abs().amax(-1, keepdim=True) / ops.FP8_MAX
    w = (w / scale).to(torch.float8_e4m3fn) if fp8 else w.to(BF16)
    w3, s2 = w.view(h, nope + v, lora), scale.view(h, nope + v) if fp8 else None
    q = torch.randn(t, h, nope + rope_dim, device=DEV, dtype=BF16)
    o_lat = torch.randn(t, h, lora, device=DEV, dtype=BF16)
    got, want = [], []
    for fn, res in ((mla_absorb.mla_absorb, got), (ops.mla_absorb_ref, want)):
        query_ht = torch.zeros(h, t, lora + rope_dim, device=DEV, dtype=BF16)
        fn(q[..., :nope], w3[:, :nope], s2[:, :nope] if fp8 else None, True, query_ht.transpose(0, 1)[..., :lora])
        o = torch.zeros(t, h * v, device=DEV, dtype=BF16)
        fn(o_lat, w3[:, nope:], s2[:, nope:] if fp8 else None, False, o.view(t, h, v))
        res += [query_ht, o]
    for a, b in zip(got, want):
        assert rel(a, b) < 5e-3


@pytest.mark.parametrize("t,fp8", [(256, True), (256, False), (1024, True)])
def test_fused_moe_flash_experts(t, fp8):
    e, h, i, k = 64, 2048, 1536, 4
    x = torch.randn(t, h, device=DEV, dtype=BF16)
    w13 = torch.randn(e, 2 * i, h, device=DEV, dtype=BF16) * h ** -0.5
    w2 = torch.randn(e, h, i, device=DEV, dtype=BF16) * i ** -0.5
    weights, ids = torch.rand(t, k, device=DEV), torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    s13 = s2 = None
    if fp8:
        s13, s2 = w13.float().abs().amax(-1, keepdim=True) / 448, w2.float().abs().amax(-1, keepdim=True) / 448
        w13, w2 = (w13.float() / s13).to(torch.float8_e4m3fn), (w2.float() / s2).to(torch.float8_e4m3fn)
    out = fused_moe.fused_experts(x, w13, w2, weights, ids, s13, s2)
    ref = fused_moe.fused_experts_ref(x, w13, w2, weights, ids, s13, s2)
    assert rel(out, ref) < (0.05 if fp8 else 0.01)


def _decode_batch(num_seqs, ctx, page_size, query_len=1):
    pages_per = -(-ctx // page_size)
    perm = torch.randperm(num_seqs * pages_per).tolist()
    seqs = [([1] * query_len, ctx - query_len, perm[b * pages_per:(b + 1) * pages_per]) for b in range(num_seqs)]
    mode = ForwardMode.DECODE if query_len == 1 else ForwardMode.PREFILL
    return ForwardBatch.build(mode, seqs, page_size, device=DEV), num_seqs * pages_per


@pytest.mark.parametrize("num_seqs,ctx,q_len", [(64, 4096, 1), (3, 1537, 512), (5, 100, 1)])
def test_gqa_attention_air(num_seqs, ctx, q_len):
    batch, num_pages = _decode_batch(num_seqs, ctx, 16, q_len)
    cache = torch.randn(2, num_pages * 16, 8, 128, device=DEV, dtype=BF16)
    q = torch.randn(batch.num_tokens, 96, 128, device=DEV, dtype=BF16)
    out = paged_attention.paged_attention(q, cache[0], cache[1], batch, 16, 128 ** -0.5)
    assert rel(out, paged_attention.paged_attention_ref(q, cache[0], cache[1], batch, 16, 128 ** -0.5)) < 1e-2


@pytest.mark.parametrize("num_seqs,ctx,q_len", [(64, 4096, 1), (2, 1100, 300)])
def test_mla_attention_flash(num_seqs, ctx, q_len):
    batch, num_pages = _decode_batch(num_seqs, ctx, 16, q_len)
    cache = torch.randn(num_pages * 16, 1, 576, device=DEV, dtype=BF16)
    q = torch.randn(batch.num_tokens, 20, 576, device=DEV, dtype=BF16)
    out = paged_attention.paged_attention(q, cache, cache[..., :512], batch, 16, 256 ** -0.5)
    ref = paged_attention.paged_attention_ref(q, cache, cache[..., :512], batch, 16, 256 ** -0.5)
    assert rel(out, ref) < 1e-2


def _mixed_decode_batch(lens, page_size=16):
    """One decode token per sequence at the given context lengths, pages shuffled."""
    pages = [-(-n // page_size) for n in lens]
    perm = torch.randperm(sum(pages)).tolist()
    seqs, at = [], 0
    for n, p in zip(lens, pages):
        seqs.append(([1], n - 1, perm[at:at + p]))
        at += p
    return ForwardBatch.build(ForwardMode.DECODE, seqs, page_size, device=DEV), sum(pages)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="Hopper warpgroup MMA")
@pytest.mark.parametrize("warps,stages", [(4, 2), (8, 2)])
@pytest.mark.parametrize("splits,min_keys", [(1, 0), (4, 32), (3, 64), (None, None)])
@pytest.mark.parametrize("q_async", [False, True])
def test_mla_decode_wg_flash(warps, stages, splits, min_keys, q_async, monkeypatch):
    """The Hopper warpgroup-MMA kernel (kernels/mla_decode_wg.py) vs the torch reference and the Triton kernel,
    GLM-4.7-Flash shapes: lengths off the 64-key tile (1, 63, 65, 130), exact tiles (64, 640) and long ones;
    split partials with empty splits (min_keys) merged; 20 heads padded to the 32-wide MMA N; q into shared
    memory through registers and by cp.async (mla_decode_wg.Q_ASYNC)."""
    from glmserve.kernels import mla_decode_wg
    from glmserve.kernels.mla_decode import mla_decode

    monkeypatch.setattr(mla_decode_wg, "Q_ASYNC", q_async)
    lens = [1, 63, 64, 65, 130, 640, 1000, 2049, 7]
    batch, num_pages = _mixed_decode_batch(lens)
    cache = torch.randn(num_pages * 16, 1, 576, device=DEV, dtype=BF16)
    q = torch.randn(len(lens), 20, 576, device=DEV, dtype=BF16)
    ref = paged_attention.paged_attention_ref(q, cache, cache[..., :512], batch, 16, 256 ** -0.5)
    out = mla_decode(q, cache, batch.page_table, batch.seq_lens, 16, 256 ** -0.5, max(lens), 512, splits,
                     min_keys=min_keys, wg=(warps, stages))
    assert not torch.isnan(out).any()
    assert rel(out, ref) < 1e-2
    tri = mla_decode(q, cache, batch.page_table, batch.seq_lens, 16, 256 ** -0.5, max(lens), 512, splits,
                     min_keys=min_keys)
    assert rel(out, tri) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="Hopper warpgroup MMA")
@pytest.mark.parametrize("q_async", [False, True])
def test_mla_decode_wg_early_pages_bit_equal(q_async, monkeypatch):
    """One split a sequence (mla_decode_wg.EARLY_PAGES engages): the first two tiles' page ids load before the
    length is known, so entries past a sequence's pages are read. They hold 2**30 here (a copy from such a page
    would fault): the output is bit-equal to the length-masked loads' and matches the torch reference."""
    from glmserve.kernels import mla_decode_wg
    from glmserve.kernels.mla_decode import mla_decode

    monkeypatch.setattr(mla_decode_wg, "Q_ASYNC", q_async)
    lens = [1, 63, 64, 65, 100, 130, 640, 7]
    batch, num_pages = _mixed_decode_batch(lens)
    table = batch.page_table.clone()
    for i, n in enumerate(lens):
        table[i, -(-n // 16):] = 2 ** 30
    cache = torch.randn(num_pages * 16, 1, 576, device=DEV, dtype=BF16)
    q = torch.randn(len(lens), 20, 576, device=DEV, dtype=BF16)
    outs = []
    for early in (True, False):
        monkeypatch.setattr(mla_decode_wg, "EARLY_PAGES", early)
        outs.append(mla_decode(q, cache, table, batch.seq_lens, 16, 256 ** -0.5, max(lens), 512, 1, min_keys=0,
                               wg=(4, 2)))
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1])
    ref = paged_attention.paged_attention_ref(q, cache, cache[..., :512], batch, 16, 256 ** -0.5)
    assert rel(outs[0], ref) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="Hopper warpgroup MMA")
@pytest.mark.parametrize("splits,min_keys", [(None, None), (4, 32)])
def test_mla_decode_wg_one_stage_bit_equal(splits, min_keys, monkeypatch):
    """mla_decode.WG_TWO_PER_SM: a launch of more programs than SMs (304 sequences of 1 .. 1100 keys, exact and
    partial tiles) runs the one-stage kernel, two programs an SM; same tiles in the same order as the two-stage
    kernel, so bit-equal, and the torch reference's values. With 4 splits of >= 32 keys short sequences leave splits
    without keys (programs that run no tile: q's copies still committed and waited for), and the partials and their
    merge are bit-equal too."""
    from glmserve.kernels import mla_decode, mla_decode_wg

    launched = []
    real = mla_decode_wg.launch
    monkeypatch.setattr(mla_decode_wg, "launch", lambda *a, **k: launched.append(k["stages"]) or real(*a, **k))
    torch.manual_seed(0)
    lens = [int(n) for n in torch.randint(1, 1100, (300,))] + [1, 63, 64, 640]
    batch, num_pages = _mixed_decode_batch(lens)
    cache = torch.randn(num_pages * 16, 1, 576, device=DEV, dtype=BF16)
    q = torch.randn(len(lens), 20, 576, device=DEV, dtype=BF16)
    outs = []
    for two in (True, False):
        monkeypatch.setattr(mla_decode, "WG_TWO_PER_SM", two)
        outs.append(mla_decode.mla_decode(q, cache, batch.page_table, batch.seq_lens, 16, 256 ** -0.5, max(lens),
                                          512, splits, min_keys=min_keys))
    torch.cuda.synchronize()
    assert launched == [1, 2], launched
    assert torch.equal(outs[0], outs[1])
    ref = paged_attention.paged_attention_ref(q, cache, cache[..., :512], batch, 16, 256 ** -0.5)
    assert rel(outs[0], ref) < 1e-2


@pytest.mark.parametrize("t", [1, 256])
def test_w_uk_launch_with_the_kv_write_bit_equal(t):
    """mla.KV_WRITE_IN_ABSORB_MAX_T at GLM-4.7-Flash's shapes (20 heads, nope 192, R 64, L 512; B 1 and 256, the
    latter on the large config's 64-token M blocks), PDL-launched: the cache rows at scattered slots, the roped
    q_pe and W_UK's product equal mla_kv_write + mla_absorb's bit for bit."""
    from glmserve.kernels.mla_kv_write import mla_kv_write

    h, nope, r, lora = 20, 192, 64, 512
    w = torch.randn(h * (nope + 256), lora, device=DEV) / lora ** 0.5
    s = w.abs().amax(-1, keepdim=True) / 448.0
    w_uk = (w / s).to(torch.float8_e4m3fn).view(h, nope + 256, lora)[:, :nope]
    s_uk = s.view(h, nope + 256)[:, :nope]
    q = torch.randn(t, h, nope + r, device=DEV, dtype=BF16)
    ckv = torch.randn(t, 768 + lora + r, device=DEV, dtype=BF16)[:, 768:]  # rows of the fused q_a + kv_a output
    norm_w = (torch.rand(lora, device=DEV) + 0.5).to(BF16)
    freqs = torch.rand(t, r // 2, device=DEV) * 100
    slots = torch.randperm(4 * t, device=DEV)[:t]
    outs = []
    for fused in (True, False):
        cache = torch.zeros(4 * t, 1, lora + r, device=DEV, dtype=BF16)
        query = torch.zeros(h, t, lora + r, device=DEV, dtype=BF16).transpose(0, 1)
        kv = (ckv, norm_w, 1e-6, freqs.cos(), freqs.sin(), cache, slots, q[..., nope:], query[..., lora:], r, True)
        if fused:
            mla_absorb.mla_absorb(q[..., :nope], w_uk, s_uk, True, query[..., :lora], None, kv)
        else:
            mla_kv_write(*kv)
            mla_absorb.mla_absorb(q[..., :nope], w_uk, s_uk, True, query[..., :lora])
        outs.append((cache, query))
    torch.cuda.synchronize()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][0][slots].abs().sum() > 0


@pytest.mark.parametrize("rows", [3, 256, 300])
def test_lm_head_fp32_logits(rows):
    """embedding.FP32_LOGITS: from FP32_LOGITS_MIN_ROWS rows the logits GEMM stores fp32 (no bf16 product and
    .float() copy): its error against the exact product is fp32 accumulation's, far below the bf16 rounding of the
    other path (H100 run 40: cuBLAS's bf16 output is not even the rounding of its fp32 sum, so no half-step bound
    between the two holds). Fewer rows: F.linear + .float(), bit for bit."""
    from glmserve.shared.model.layers import embedding

    head = embedding.ParallelLMHead(151552, 2048, dtype=BF16, device=DEV)
    head.weight.data.normal_(0, 0.02)
    x = torch.randn(rows, 2048, device=DEV, dtype=BF16)
    got = head(x)
    rounded = torch.nn.functional.linear(x, head.weight).float()
    assert got.dtype == torch.float32 and got.shape == (rows, 151552)
    if rows < embedding.FP32_LOGITS_MIN_ROWS:
        assert torch.equal(got, rounded)
        return
    exact = x.double() @ head.weight.double().t()
    err, err_bf16 = (got.double() - exact).abs(), (rounded.double() - exact).abs()
    assert err.max() < 1e-4 * exact.abs().max()
    assert err.mean() < err_bf16.mean() / 8


def test_kv_pages_air_layout():
    buf = torch.randn(47, 2, 300, 16, 8, 128, device=DEV, dtype=BF16)
    ids = torch.randperm(300, device=DEV)[:37]
    packed = kv_pages.gather_pages(buf, ids)
    assert torch.equal(packed, kv_pages.gather_pages_ref(buf, ids))


def test_ops_signatures_at_air_shapes():
    """The out-of-place ops the model calls (rope on a view, fp8_linear on [T, H]) at real sizes."""
    t = 333
    q = torch.randn(t, 96 * 128 + 2 * 1024, device=DEV, dtype=BF16)[:, : 96 * 128].view(t, 96, 128)
    cos, sin = rope.cos_sin_cache(64, 8192, 1e6, DEV)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    out = rope.rope(q, cos[pos], sin[pos], 64, False)
    torch.testing.assert_close(out.float(), ops.rope_ref(q.float(), cos[pos], sin[pos], 64, False), rtol=1e-2, atol=1e-2)
    x = torch.randn(t, 4096, device=DEV, dtype=BF16)
    w_q, w_s = fp8_weight(12288, 4096)
    y = fp8_gemm.fp8_linear(x, w_q, w_s, None)
    exact = x.float() @ (w_q.float() * w_s).t()
    assert y.dtype == BF16 and rel(y, exact) < 0.05


@pytest.mark.parametrize("t,k,e", [(256, 4, 64), (64, 8, 160), (1024, 8, 128)])
def test_one_launch_align_at_decode_sizes(t, k, e):
    from glmserve.kernels.moe_align import moe_align as align_kernel

    ids = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    for block_m in (16, 32, 64):
        got, ref = align_kernel(ids, e, block_m), moe_route.moe_align(ids, e, block_m)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    shared = torch.cat([ids, torch.full_like(ids[:, :1], e)], dim=1)  # + the fused shared expert's slot
    for block_m in (16, 32, 64):
        got, ref = align_kernel(shared, e + 1, block_m, dense_last=True), moe_route.moe_align(shared, e + 1, block_m)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("t,e,k,h", [(1, 64, 4, 2048), (16, 64, 4, 2048), (4, 160, 8, 5120)])
def test_route_align_in_a_cuda_graph(t, e, k, h):
    """moe_route_align's one launch (GLM-4.7-Flash, GLM-4.5 routers + the fused shared slot): moe_route's ids and
    weights and moe_align's layout, on every replay of a CUDA graph holding two launches (one arrival counter
    shared), the counter back at 0."""
    from glmserve.kernels.moe_route_align import moe_route_align

    g = torch.Generator(device=DEV).manual_seed(t + e)
    xs = [torch.randn(t, h, device=DEV, generator=g).to(BF16) for _ in range(2)]
    gate = (torch.randn(e, h, device=DEV, generator=g) * 0.02).to(BF16)
    bias = torch.randn(e, device=DEV, generator=g) * 0.01
    block_m = fused_moe.expert_block_m(gate.device, t * (k + 1), e + 1, True)
    wants = []
    for x in xs:
        w, ids = moe_route.moe_route(x, gate, bias, k, 1, 1, True, 2.5, True)
        wants.append((w, ids, *moe_route.moe_align(ids, e + 1, block_m)))
    args = (gate, bias, k, 1, 1, True, 2.5, True, e + 1, True)
    assert moe_route_align(xs[0], *args)[2] is not None  # the arrival counter made here, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [moe_route_align(x, *args) for x in xs]
    for _ in range(3):
        for w, ids, (pairs, blocks, _) in outs:
            for o in (w, ids, pairs, blocks):
                o.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        for (w, ids, (pairs, blocks, bm)), (w_ref, ids_ref, pairs_ref, blocks_ref) in zip(outs, wants):
            assert bm == block_m and torch.equal(ids, ids_ref)
            torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
            assert torch.equal(pairs, pairs_ref) and torch.equal(blocks, blocks_ref)
    assert not _common._arrival[gate.device].any()


@pytest.mark.parametrize("t,e,k,h", [(1, 64, 4, 2048), (4, 64, 4, 2048), (1, 160, 8, 5120)])
def test_norm_in_route_align_in_a_cuda_graph(t, e, k, h, monkeypatch):
    """add_rms_norm_route_align's one launch (the post-attention norm inside the router's, NORM_MAX_T) at
    GLM-4.7-Flash's and GLM-4.5's shapes, replayed in a CUDA graph: s bit-equal to add_rms_norm_fp8's, y and its
    FP8 form within one bf16 step of it (the rstd's reduction is shaped differently), moe_route's experts and
    weights for the y it stored, and the arrival counter back at 0."""
    from glmserve.kernels import moe_route_align as ra, rmsnorm

    monkeypatch.setattr(ra, "NORM_MAX_T", 4)
    g = torch.Generator(device=DEV).manual_seed(t + h)
    x = torch.randn(t, h, device=DEV, generator=g).to(BF16)
    res = (torch.randn(t, h, device=DEV, generator=g) * 4).to(BF16)
    nw = (1 + 0.1 * torch.randn(h, device=DEV, generator=g)).to(BF16)
    gate = (torch.randn(e, h, device=DEV, generator=g) * 0.02).to(BF16)
    bias = torch.randn(e, device=DEV, generator=g) * 0.01
    args = (x, res, nw, 1e-5, True, gate, bias, k, 1, 1, True, 2.5, True, e + 1, True)
    y_ref, s_ref, (q_ref, qs_ref) = rmsnorm.add_rms_norm_fp8(x, res, nw, 1e-5)
    ids_ref = moe_route.moe_route(y_ref, gate, bias, k, 1, 1, True, 2.5, True)[1]
    assert ra.add_rms_norm_route_align(*args)[0] is not None  # the arrival counter made here, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s, (q, qs), w, ids, _ = ra.add_rms_norm_route_align(*args)
    for _ in range(3):
        for o in (y, s, w):
            o.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s, s_ref)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(qs, qs_ref, rtol=8e-3, atol=0)
        torch.testing.assert_close(q.float() * qs, q_ref.float() * qs_ref, rtol=0.07, atol=qs.max().item())
        w_y, ids_y = moe_route.moe_route(y, gate, bias, k, 1, 1, True, 2.5, True)  # routing of the y it stored
        assert torch.equal(ids, ids_y)
        torch.testing.assert_close(w, w_y, rtol=1e-5, atol=1e-6)
        assert (ids == ids_ref).float().mean() > 0.7  # and of the separate norm's y, up to near ties
    assert not _common._arrival[gate.device].any()


@pytest.mark.parametrize("h,i,e,k", [(2048, 1536, 65, 5), (5120, 1536, 17, 9)])  # GLM-4.5: 16 of its experts
def test_next_norm_down_gemv_in_a_cuda_graph(h, i, e, k, monkeypatch):
    """fused_experts_norm's one launch (the next layer's input norm by the down GEMV's last program, T 1:
    fused_moe.NEXT_NORM_MAX_T) at GLM-4.7-Flash's and GLM-4.5's expert shapes (routed + the shared slot), replayed in
    a CUDA graph: s, y and y's FP8 form against the slot form then add_rms_norm_fp8 (s bit-equal: the same slot sum
    and add; y within one bf16 step: the rstd's reduction runs over 4 warps, not 8), the counter back at 0."""
    from glmserve.kernels import rmsnorm

    monkeypatch.setattr(fused_moe, "NEXT_NORM_MAX_T", 1)
    monkeypatch.setattr(fused_moe, "GEMV_MAX_T", 1)
    g = torch.Generator(device=DEV).manual_seed(h)
    x = torch.randn(1, h, device=DEV, generator=g).to(BF16)
    w13, w2 = torch.randn(e, 2 * i, h, device=DEV, generator=g), torch.randn(e, h, i, device=DEV, generator=g)
    s13, s2 = w13.abs().amax(-1, keepdim=True) / 448.0, w2.abs().amax(-1, keepdim=True) / 448.0
    q13, q2 = (w13 / s13).to(torch.float8_e4m3fn), (w2 / s2).to(torch.float8_e4m3fn)
    del w13, w2
    ids = torch.cat([torch.randperm(e - 1, device=DEV, generator=g)[: k - 1], torch.tensor([e - 1], device=DEV)])[None]
    weights = torch.rand(1, k, device=DEV, generator=g)
    res = (torch.randn(1, h, device=DEV, generator=g) * 4).to(BF16)
    nw = (1 + 0.1 * torch.randn(h, device=DEV, generator=g)).to(BF16)
    args = (x, q13, q2, weights, ids, s13, s2, True, None, None, res, nw, 1e-5, True)
    slots = fused_moe.fused_experts(x, q13, q2, weights, ids, s13, s2, True, None, True)
    y_ref, s_ref, (q_ref, qs_ref) = rmsnorm.add_rms_norm_fp8(slots, res, nw, 1e-5)
    fused_moe.fused_experts_norm(*args)  # the arrival counters made here, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s, (q, qs) = fused_moe.fused_experts_norm(*args)
    for _ in range(3):
        for o in (y, s):
            o.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s, s_ref)  # the same GEMV programs' slot rows, summed and added in the same order
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(q.float() * qs, q_ref.float() * qs_ref, rtol=0.1, atol=2 * qs.max().item())
    assert not _common._arrival[x.device].any()
