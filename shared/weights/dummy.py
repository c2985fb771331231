"""--load-format dummy: random weights at the real config (benchmarks; every worker rank).

Routing stays realistic: router weights are scaled so router logits have unit spread on unit-RMS inputs,
and correction biases are tiny, so random tokens spread over the experts instead of pinning to a few.
Embeddings have unit std and output projections of residual branches are scaled down by sqrt(2 * layers) so per-token embeddings keep
dominating the residual stream (attention averaging otherwise makes all tokens alike and skews routing).
Replicated parameters get the same values on every TP rank (seeded by name).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.model.layers.linear import quantize_per_channel


def _fill(name: str, p: torch.Tensor, cfg: ModelConfig, gen: torch.Generator) -> None:
    shape, dev = p.shape, p.device
    if name.endswith("_scale"):
        return
    if "norm" in name:
        p.fill_(1.0)
    elif name.endswith("e_score_correction_bias"):
        p.copy_(1e-3 * torch.randn(shape, generator=gen, device=dev))
    elif name.endswith("mlp.gate.weight"):
        w = torch.randn(shape, generator=gen, device=dev) / cfg.hidden_size ** 0.5
        p.copy_(w.to(torch.bfloat16))  # bf16 values, as checkpoints store the gate
    elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn(shape, generator=gen, device=dev))
    else:
        std = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
        if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):  # residual branches (GPT-2 style)
            std /= (2 * (cfg.num_hidden_layers + 1)) ** 0.5
        p.copy_((torch.randn(shape, generator=gen, device=dev) * std).to(p.dtype))


@torch.no_grad()
def init_dummy(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    for name, p in model.named_parameters():
        gen = torch.Generator(device=p.device).manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
        if p.dtype == torch.float8_e4m3fn:
            w = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            _fill(name, w, cfg, gen)
            q, scale = quantize_per_channel(w.reshape(-1, w.shape[-1]))
            p.copy_(q.reshape(p.shape))
            owner, _, leaf = name.rpartition(".")
            scale_name = {"weight": "weight_scale", "w13": "w13_scale", "w2": "w2_scale"}[leaf]
            model.get_submodule(owner).get_parameter(scale_name).copy_(scale.reshape(*p.shape[:-1], 1))
        else:
            w = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            _fill(name, w, cfg, gen)
            p.copy_(w.to(p.dtype))
