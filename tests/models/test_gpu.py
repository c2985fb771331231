"""CUDA checks of the model (run by the lead on the device; skipped without CUDA):
bf16 parity with transformers, TP=2 over NCCL vs TP=1, and the W8A8 FP8 path vs dequantized weights.

Tolerances (bf16): our logits vs HF fp32 must be within max(3e-2, 2 x HF-bf16's own error vs HF fp32).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.generate import free_port
from shared.kvcache.cache import PagedKVCache
from shared.runner.batch import ForwardBatch, ForwardMode
from shared.runner.model_runner import ModelRunner
from shared.weights.fp8_convert import convert_to_fp8
from shared.weights.tiny import write_tiny_checkpoint
from tests.models.tp_scenario import run_workload, tp_rank_main

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]]
BIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=8)


def _rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().cpu().abs().max())


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
    worst, worst_hf = 0.0, 0.0
    for _ in range(8):  # teacher-forced with the fp32 reference's greedy tokens
        ref = _hf_last_logits(hf32, seqs, "cuda")
        worst = max(worst, _rel(out.logits, ref))
        worst_hf = max(worst_hf, _rel(_hf_last_logits(hf16, seqs, "cuda"), ref))
        toks = ref.argmax(-1).tolist()
        batch = ForwardBatch.build(ForwardMode.DECODE, [([t], len(s), tb) for s, t, tb in zip(seqs, toks, tables)],
                                   16, device="cuda")
        for s, t in zip(seqs, toks):
            s.append(t)
        out = runner.forward(batch, kv)
    print(f"{arch} bf16 max rel err vs HF fp32: ours {worst:.3e}, HF bf16 {worst_hf:.3e}")
    assert worst <= max(3e-2, 2 * worst_hf)


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
        for key in ("prefill_logits", "decode0_logits"):
            err = _rel(got[key], want[key])
            print(f"{path} {key} TP2-vs-TP1 bf16 rel err {err:.3e}")
            assert err <= 3e-2, key


def test_fp8_w8a8_cuda_matches_dequantized(tmp_path):
    src = write_tiny_checkpoint(str(tmp_path / "f"), "glm4_moe", seed=5, **BIG)
    fp8_dir = convert_to_fp8(src, str(tmp_path / "fp8"), str(tmp_path / "deq"))
    got = run_workload(fp8_dir, device="cuda", dtype=torch.bfloat16)
    want = run_workload(str(tmp_path / "deq"), device="cuda", dtype=torch.float32)
    err = _rel(got["prefill_logits"], want["prefill_logits"])
    print(f"fp8 W8A8 (bf16 act) vs dequantized fp32 prefill logits rel err {err:.3e}")
    assert err <= 5e-2
