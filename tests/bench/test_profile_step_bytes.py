"""bench/profile_step.py's per-kernel HBM figures: the bytes each kernel group must move in one decode
step, and the fraction of the copy bandwidth its profiled time reaches (a tiny FP8 model on CPU; the
GPU suite prints the same table for GLM-4.7-Flash)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from torch.autograd import DeviceType

from bench.profile_step import hbm_by_kernel, step_bytes
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.tiny import write_tiny_checkpoint


@pytest.mark.parametrize("fuse", [True, False])
def test_step_bytes_of_a_tiny_fp8_model(tmp_path, fuse):
    path = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=0)
    runner = ModelRunner(path, quantization="fp8", with_mtp=False, fuse_shared_experts=fuse)
    e = runner.config.n_routed_experts
    slots = e + int(fuse)  # a fused shared expert is the stacked experts' last slot, read by every token
    per_layer: dict[int, int] = {}
    dense = other = kv_b = 0
    for name, p in runner.model.named_parameters():
        n = p.numel() * p.element_size()
        if ".experts." in name:
            assert p.shape[0] == slots
            layer = int(name.split(".layers.")[1].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + n
        else:
            other += n
            if ".kv_b_proj." in name:  # the absorbed MLA's two GEMMs read it, not an _fp8_gemm launch
                kv_b += n
            elif p.dtype == torch.float8_e4m3fn or name.endswith("weight_scale"):
                dense += n
    assert per_layer and dense > 0 and kv_b > 0
    assert any("shared_experts" in name for name, _ in runner.model.named_parameters()) != fuse
    touched = {layer: 2 for layer in per_layer}  # two of E routed experts per MoE layer
    moe = sum(per_layer.values()) * (2 + slots - e) / slots
    weights, groups = step_bytes(runner, touched, kv_bytes=1234.0)
    groups = {label: (pats, b) for label, pats, b in groups}
    assert groups["MoE GEMM (touched experts)"][1] == pytest.approx(moe)
    assert groups["MLA decode (latent cache)"][1] == 1234.0
    assert groups["dense FP8 GEMMs (weights)"] == (("_fp8_gemm",), dense)
    assert groups["MLA absorb (kv_b_proj)"] == (("_mla_absorb",), kv_b)
    embed = runner.model.model.embed_tokens.weight
    assert weights == pytest.approx(other - embed.numel() * embed.element_size() + moe)
    _, bf16_groups = step_bytes(ModelRunner(path, with_mtp=False), touched, 0.0)
    assert "dense FP8 GEMMs (weights)" not in {g[0] for g in bf16_groups}  # no FP8 weights, no such row


def test_fraction_of_hbm_per_kernel_group():
    def ev(key, us, count, dev=DeviceType.CUDA):
        return SimpleNamespace(key=key, self_device_time_total=us, count=count, device_type=dev)

    averages = [ev("_moe_gemm_kernel", 2000.0, 4), ev("_mla_decode_kernel", 500.0, 2), ev("_merge_kernel", 50.0, 2),
                ev("aten::mm", 300.0, 1, DeviceType.CPU), ev("void at::native::elementwise_kernel", 100.0, 7),
                ev("cuLaunchKernelEx", 170.0, 1264, DeviceType.CPU)]
    groups = [("moe", ("_moe_gemm",), 4e9), ("mla", ("_mla_decode",), 1e9), ("dense", ("_fp8_gemm",), 1e8)]
    rows = {r["kernel"]: r for r in hbm_by_kernel(averages, groups, bw_gbps=4000.0)}
    assert rows["moe"]["ms"] == 2.0 and rows["moe"]["calls"] == 4
    assert rows["moe"]["fraction_of_hbm"] == pytest.approx(4e9 / 4000e9 / 2e-3)  # 1 ms floor over 2 ms: 0.5
    assert rows["mla"]["fraction_of_hbm"] == pytest.approx(0.5)
    assert rows["dense"]["ms"] == 0 and rows["dense"]["fraction_of_hbm"] == 0
    # the rest: device kernels only (an aten:: op's time is its kernels' time, already in the list; a launch
    # call is host time)
    assert rows["all other kernels"]["ms"] == pytest.approx(0.15) and rows["all other kernels"]["calls"] == 9


def test_prefill_active_params_same_fused_or_not(tmp_path):
    """bench/prefill_step's FLOP count: a fused shared expert is a stacked slot every token multiplies."""
    from bench.prefill_step import active_params

    path = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe", seed=0)
    fused, plain = ModelRunner(path, with_mtp=False), ModelRunner(path, with_mtp=False, fuse_shared_experts=False)
    assert fused.model.model.layers[1].mlp.shared_experts is None
    assert active_params(fused) == pytest.approx(active_params(plain))
    assert active_params(fused) < sum(p.numel() for p in fused.model.parameters())
