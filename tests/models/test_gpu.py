"""CUDA checks of the model (run by the lead on the device; skipped without CUDA):
bf16 parity with transformers, TP=2 over NCCL vs TP=1, and the W8A8 FP8 path vs dequantized weights.

Tolerances (bf16; per-row max relative logit error vs transformers in bf16 on the same GPU, teacher-forced;
likewise TP2 vs TP1): median <= 2e-2, 90th percentile <= 5e-2, greedy
top-1 agreement >= 90% (random tiny weights have routing near-ties that bf16 rounding flips on a few rows),
where a row also agrees when our argmax is a near-tie in the reference (within 2e-2 of its max |logit|).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmserve.shared.generate import free_port
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.fp8_convert import convert_to_fp8
from glmserve.shared.weights.tiny import write_tiny_checkpoint
from tests.models.tp_scenario import run_workload, tp_rank_main

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]]
BIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=8)


def _rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().cpu().abs().max())


def _check_close(what: str, errs: list[float], agree: list[bool], med_tol=2e-2, p90_tol=5e-2, top1_min=0.9):
    """Per-row max rel error: median <= med_tol, 90th percentile <= p90_tol; top-1 agreement >= top1_min."""
    errs = sorted(errs)
    med, p90, top1 = errs[len(errs) // 2], errs[int(0.9 * (len(errs) - 1))], sum(agree) / len(agree)
    print(f"{what}: median {med:.2e} p90 {p90:.2e} max {errs[-1]:.2e} top1 {top1:.2f}")
    # random tiny weights have routing near-ties: bf16 rounding flips an expert on a few rows
    assert med <= med_tol and p90 <= p90_tol and top1 >= top1_min


def _top1(ours: torch.Tensor, ref: torch.Tensor, tie_tol: float = 2e-2) -> bool:
    """Same greedy token, or ours is a near-tie in the reference (its reference logit within tie_tol of the max)."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return bool(ref.max() - ref[ours.argmax()] <= tie_tol * ref.abs().max())


def _rows(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[bool]]:
    return [_rel(x, y) for x, y in zip(a, b)], [_top1(x, y) for x, y in zip(a, b)]


def _hf_last_logits(hf, seqs, device):
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([s], device=device)).logits[0, -1].float().cpu() for s in seqs])


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_bf16_parity_cuda(tmp_path, arch):
    kw = dict(BIG, num_key_value_heads=2, head_dim=32) if arch == "glm4_moe" else dict(BIG, num_key_value_heads=8)
    model_dir = write_tiny_checkpoint(str(tmp_path / arch), arch, seed=4, **kw)
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    runner = ModelRunner(model_dir, device="cuda", dtype="bfloat16")
    kv = PagedKVCache(runner.kv_layout(16), 16, "cuda")
    tables = [[1, 2], [3, 4], [5, 6]]  # 16-token pages; every sequence stays under 32 tokens
    seqs = [list(p) for p in PROMPTS]
    batch = ForwardBatch.build(ForwardMode.PREFILL, [(p, 0, t) for p, t in zip(seqs, tables)], 16, device="cuda")
    out = runner.forward(batch, kv)
    errs, agree = [], []
    for _ in range(8):  # teacher-forced with the fp32 reference's greedy tokens
        ref16, ref32 = _hf_last_logits(hf16, seqs, "cuda"), _hf_last_logits(hf32, seqs, "cuda")
        for i in range(len(seqs)):
            errs.append(_rel(out.logits[i], ref16[i]))
            agree.append(_top1(out.logits[i], ref16[i]))
        toks = ref32.argmax(-1).tolist()
        batch = ForwardBatch.build(ForwardMode.DECODE, [([t], len(s), tb) for s, t, tb in zip(seqs, toks, tables)],
                                   16, device="cuda")
        for s, t in zip(seqs, toks):
            s.append(t)
        out = runner.forward(batch, kv)
    _check_close(f"{arch} bf16 vs HF bf16", errs, agree)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_matches_tp1(tmp_path):
    cases = []
    for arch in ("glm4_moe", "glm4_moe_lite"):
        model_dir = write_tiny_checkpoint(str(tmp_path / arch), arch, seed=3, **BIG)
        cases.append((model_dir, str(tmp_path / f"{arch}.pt")))
    torch.multiprocessing.spawn(tp_rank_main, args=(2, free_port(), cases, "cuda"), nprocs=2, join=True)
    for model_dir, path in cases:
        want = run_workload(model_dir, device="cuda", dtype=torch.bfloat16)
        got = torch.load(f"{path}.rank0")
        errs, agree = [], []
        for key in ("prefill_logits", "decode0_logits", "decode1_logits", "decode2_logits", "draft_logits"):
            e, a = _rows(got[key], want[key])
            errs, agree = errs + e, agree + a
        _check_close(f"{model_dir} TP2 (NCCL) vs TP1 bf16", errs, agree)


def test_fp8_w8a8_cuda_matches_dequantized(tmp_path):
    """CUDA FP8 (W8A8 kernels, bf16) vs the fp32 dequantized-weights reference. Per-token fp8 activations on a
    random tiny model move logits by ~6% (the CPU emulation of this test: median 6.5e-2, p90 8.9e-2, top-1
    0.93), so the bound here is loose; the exact 2e-2 check is tests/weights/test_fp8.py (CPU, dequantized
    weights) and the GEMM itself is checked against its reference in tests/kernels."""
    src = write_tiny_checkpoint(str(tmp_path / "f"), "glm4_moe", seed=5, std=0.03, **BIG)
    fp8_dir = convert_to_fp8(src, str(tmp_path / "fp8"), str(tmp_path / "deq"))
    got = run_workload(fp8_dir, device="cuda", dtype=torch.bfloat16)
    want = run_workload(str(tmp_path / "deq"))
    errs, agree = [], []
    for key in want:
        if key.endswith("logits"):
            e, a = _rows(got[key], want[key])
            errs, agree = errs + e, agree + a
    _check_close("fp8 W8A8 cuda bf16 vs dequantized fp32", errs, agree, med_tol=0.1, p90_tol=0.15, top1_min=0.75)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 70e9,
                    reason="needs a GPU with >= 70 GB")
def test_flash_real_shape_dummy(tmp_path):
    """GLM-4.7-Flash at its real shape with dummy bf16 weights: a batched prefill of 256 random tokens touches
    >= 90% of the experts in every MoE layer, decode and MTP logits are finite, and graphs replay."""
    import time

    from glmserve.shared.config.presets import write_preset

    runner = ModelRunner(write_preset(str(tmp_path / "flash"), "glm-4.7-flash"), device="cuda", dtype="bfloat16",
                         load_format="dummy")
    kv = PagedKVCache(runner.kv_layout(16), 64, "cuda")
    runner.track_expert_usage()
    ids = torch.randint(0, 154880, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = ForwardBatch.build(ForwardMode.PREFILL, [(ids, 0, list(range(1, 18)))], 16, device="cuda")
    out = runner.forward(batch, kv)
    draft = runner.mtp_forward(batch, batch.input_ids, out.hidden, kv)  # routes the MTP layer's MoE too
    touched = {i: int((c > 0).sum()) for i, c in runner.expert_usage().items()}
    print("experts touched per MoE layer (of 64):", touched)
    assert all(n >= 0.9 * 64 for n in touched.values()) and torch.isfinite(out.logits).all()
    assert torch.isfinite(draft.logits).all()
    runner.track_expert_usage(False)
    runner.capture_decode_graphs(kv, max_batch_size=8, max_seq_len=512)
    dec = ForwardBatch.build(ForwardMode.DECODE, [([7], 256, list(range(1, 18)))], 16, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        res = runner.forward(dec, kv)
    torch.cuda.synchronize()
    print(f"flash dummy bf16 decode step (batch 1, graph): {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms")
    assert torch.isfinite(res.logits).all()
