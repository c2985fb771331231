"""TP=2 (two processes, real torch.distributed gloo) equals TP=1 within 1e-5 for both architectures,
including kv-head replication (tp > num_key_value_heads), a vocab not divisible by tp, and an FP8 checkpoint."""

import pytest
import torch

from glmserve.shared.generate import free_port
from glmserve.shared.weights.fp8_convert import convert_to_fp8
from glmserve.shared.weights.tiny import write_tiny_checkpoint
from tests.models.tp_scenario import run_workload, tp_rank_main

CASES = {
    "glm4_moe": dict(arch="glm4_moe"),
    "glm4_moe_kv1_vocab251": dict(arch="glm4_moe", num_key_value_heads=1, vocab_size=251),
    "glm4_moe_lite": dict(arch="glm4_moe_lite"),
    "glm4_moe_fp8": dict(arch="glm4_moe", fp8=True),  # per-channel scales sharded with their rows
}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_tp2_equals_tp1(tmp_path):
    cases = []
    for name, kw in CASES.items():
        kw = dict(kw)
        fp8 = kw.pop("fp8", False)
        model_dir = write_tiny_checkpoint(str(tmp_path / name), seed=3, **kw)
        if fp8:
            model_dir = convert_to_fp8(model_dir, str(tmp_path / f"{name}_fp8"))
        cases.append((model_dir, str(tmp_path / f"{name}.pt")))
    torch.multiprocessing.spawn(tp_rank_main, args=(2, free_port(), cases, "cpu"), nprocs=2, join=True)
    for model_dir, path in cases:
        want = run_workload(model_dir)
        assert "draft_logits" in want
        for rank in (0, 1):
            got = torch.load(f"{path}.rank{rank}")
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].shape == want[key].shape, key
                assert _max_rel(got[key], want[key]) <= 1e-5, (path, rank, key)
