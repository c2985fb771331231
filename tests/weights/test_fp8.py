"""FP8: a compressed-tensors checkpoint (per-channel weight scales, dynamic per-token activations) loads
as FP8 and matches the dequantized-weights reference within 2e-2; --quantization fp8 on a float
checkpoint quantizes at load exactly as the offline conversion does. (The CPU path dequantizes the
weights; the CUDA W8A8 path is checked by the gpu-marked test in tests/models/test_gpu.py.)"""

import pytest
import torch
from safetensors.torch import load_file

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.runner.model_runner import ModelRunner
from glmserve.shared.weights.fp8_convert import convert_to_fp8
from glmserve.shared.weights.tiny import write_tiny_checkpoint
from tests.models.tp_scenario import run_workload


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_fp8_checkpoint_matches_dequantized(tmp_path, arch):
    src = write_tiny_checkpoint(str(tmp_path / "bf"), arch, seed=5)
    fp8_dir = convert_to_fp8(src, str(tmp_path / "fp8"), str(tmp_path / "deq"))
    cfg = ModelConfig.from_dir(fp8_dir)
    assert cfg.quantization is not None and cfg.quantization.method == "compressed-tensors"
    runner = ModelRunner(fp8_dir)
    attn = runner.model.model.layers[1].self_attn
    assert attn.o_proj.weight.dtype == torch.float8_e4m3fn and attn.o_proj.weight_scale.shape[1] == 1
    assert runner.model.model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert runner.model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router is never fp8
    got, want = run_workload(fp8_dir), run_workload(str(tmp_path / "deq"))
    for key in want:
        assert _rel(got[key], want[key]) <= 2e-2, key
    orig = run_workload(src)  # the fp8 weights really differ from the float ones
    assert _rel(got["prefill_logits"], orig["prefill_logits"]) > 1e-4


def test_online_fp8_quantization_equals_fp8_checkpoint(tmp_path):
    """--quantization fp8 on a float checkpoint = loading its compressed-tensors conversion (same scales)."""
    src = write_tiny_checkpoint(str(tmp_path / "f"), "glm4_moe", seed=6)
    fp8_dir = convert_to_fp8(src, str(tmp_path / "fp8"))
    runner = ModelRunner(src, quantization="fp8")
    assert runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert runner.model.model.layers[3].eh_proj.weight.dtype == torch.float32  # MTP eh_proj ignored
    got, want, orig = run_workload(src, quantization="fp8"), run_workload(fp8_dir), run_workload(src)
    for key in want:
        assert _rel(got[key], want[key]) <= 1e-5, key
    assert _rel(got["prefill_logits"], orig["prefill_logits"]) > 1e-4


def test_block_scaled_fp8_checkpoint(tmp_path):
    """`quant_method: fp8` + weight_block_size: blocks dequantize at load, then re-quantize per channel;
    equals the dequantized float checkpoint run with --quantization fp8."""
    src = write_tiny_checkpoint(str(tmp_path / "f"), "glm4_moe_lite", seed=8)
    blk = convert_to_fp8(src, str(tmp_path / "blk"), str(tmp_path / "deq"), block=(16, 16))
    cfg = ModelConfig.from_dir(blk)
    assert cfg.quantization.weight_strategy == "block" and cfg.quantization.weight_block_size == (16, 16)
    assert ModelRunner(blk).model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    got, want = run_workload(blk), run_workload(str(tmp_path / "deq"), quantization="fp8")
    for key in want:
        assert _rel(got[key], want[key]) <= 1e-5, key
    orig, deq = load_file(f"{src}/model.safetensors"), load_file(f"{tmp_path}/deq/model.safetensors")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: a partial block
    assert 0 < _rel(deq[name], orig[name]) <= 0.07  # the dequantized twin really is W_fp8 * block scale


def test_mla_fp8_up_projections_are_views_of_kv_b_proj(tmp_path):
    """The absorbed form reads kv_b_proj's own FP8 weight and scale (ops.mla_absorb dequantizes in registers):
    W_UK / W_UV and their scales are views into them, so no dequantized copy is ever held."""
    src = write_tiny_checkpoint(str(tmp_path / "f"), "glm4_moe_lite", seed=7)
    runner = ModelRunner(src, quantization="fp8")
    attn = runner.model.model.layers[1].self_attn
    kv_b = attn.kv_b_proj
    assert kv_b.weight.dtype == torch.float8_e4m3fn
    w_uk, w_uv, s_uk, s_uv = attn._up_weights()
    assert w_uk.dtype == w_uv.dtype == torch.float8_e4m3fn
    for view, base in ((w_uk, kv_b.weight), (w_uv, kv_b.weight), (s_uk, kv_b.weight_scale), (s_uv, kv_b.weight_scale)):
        assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    h, nope, v, lora = attn.num_heads, attn.nope, attn.v_dim, attn.lora
    full = kv_b.weight.view(h, nope + v, lora)
    assert torch.equal(w_uk.view(torch.uint8), full[:, :nope].view(torch.uint8))
    assert torch.equal(w_uv.view(torch.uint8), full[:, nope:].view(torch.uint8))
    assert torch.equal(s_uv, kv_b.weight_scale.view(h, nope + v)[:, nope:])
