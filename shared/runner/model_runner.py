"""ModelRunner: config + weights + model on one device/dtype/TP rank (every rank of prefill and decode workers).

It owns only the model; the KV cache (`PagedKVCache`, built from `kv_layout()`) and the batches belong to
the caller. `forward(batch, kv_cache)` writes the batch tokens' KV into their slots and returns
ForwardOutput(logits [R, V] fp32 full vocab at batch.logits_indices, hidden [T, H] after the final norm).
`mtp_forward` runs the checkpoint's MTP layer (cache layer num_hidden_layers), spec §3.2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from shared.config.model import ModelConfig
from shared.kvcache.cache import KVLayout
from shared.model.attention_layout import kv_layout_for
from shared.model.context import BuildCtx
from shared.model.layers.moe import MoE
from shared.model.parallel import SINGLE, TPGroup
from shared.model.registry import model_class
from shared.runner.batch import ForwardBatch
from shared.weights.dummy import init_dummy
from shared.weights.fp8 import fp8_policy
from shared.weights.loader import load_checkpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # [R, V] fp32, rows = batch.logits_indices
    hidden: torch.Tensor  # [T, H]


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


class ModelRunner:
    def __init__(
        self,
        model_dir: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        tp: TPGroup = SINGLE,
        load_format: str = "auto",
        quantization: str | None = None,
        with_mtp: bool = True,
        seed: int = 0,
    ):
        """load_format: "auto" (safetensors in model_dir) | "dummy" (random weights, realistic routing).
        quantization: None (as the checkpoint is) | "fp8" (quantize a float checkpoint at load)."""
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format {load_format!r}: expected auto or dummy")
        self.config = ModelConfig.from_dir(model_dir)
        self.device, self.dtype, self.tp = torch.device(device), to_dtype(dtype), tp
        if self.device.type == "cuda":  # Triton kernels for CUDA tensors; CPU keeps the torch refs
            from kernels.backend import install

            install()
        policy = fp8_policy(self.config, model_dir if load_format == "auto" else None, quantization)
        ctx = BuildCtx(tp=tp, dtype=self.dtype, device=self.device, fp8_modules=policy)
        self.model = model_class(self.config)(self.config, ctx, with_mtp=with_mtp).eval()
        self.num_mtp_layers = self.model.num_mtp_layers
        if load_format == "dummy":
            init_dummy(self.model, self.config, seed)
        else:
            q = self.config.quantization
            block = q.weight_block_size if q is not None and q.weight_strategy == "block" else None
            load_checkpoint(self.model, model_dir, self.config.num_hidden_layers, self.num_mtp_layers, block)

    @property
    def has_mtp(self) -> bool:
        return self.num_mtp_layers > 0

    def kv_layout(self, page_size: int, dtype: torch.dtype | None = None) -> KVLayout:
        """Cache layout for this rank: main layers plus the MTP layer when it is loaded."""
        return kv_layout_for(self.config, self.tp.tp_size, page_size, dtype or self.dtype,
                             self.config.num_hidden_layers + self.num_mtp_layers)

    def track_expert_usage(self, enabled: bool = True) -> None:
        """Start (and zero) or stop counting tokens routed to each expert of every MoE layer."""
        for m in self.model.modules():
            if isinstance(m, MoE):
                m.expert_counts = torch.zeros(self.config.n_routed_experts, dtype=torch.int64,
                                              device=self.device) if enabled else None

    def expert_usage(self) -> dict[int, torch.Tensor]:
        """{layer index: [E] tokens routed per expert} since track_expert_usage (benchmarks print it)."""
        return {i: layer.mlp.expert_counts.cpu() for i, layer in enumerate(self.model.model.layers)
                if isinstance(layer.mlp, MoE) and layer.mlp.expert_counts is not None}

    @torch.no_grad()  # not inference_mode: callers may update the outputs in place
    def forward(self, batch: ForwardBatch, kv_cache) -> ForwardOutput:
        hidden = self.model(batch, kv_cache)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        return ForwardOutput(logits, hidden)

    @torch.no_grad()  # not inference_mode: callers may update the outputs in place
    def mtp_forward(self, batch: ForwardBatch, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                    kv_cache) -> ForwardOutput:
        """Draft: row t carries target hidden prev_hidden[t] (position batch.positions[t]) and the next token
        input_ids[t]. Returns (logits [R, V] of the token after input_ids, hidden [T, H] pre shared_head.norm)."""
        return ForwardOutput(*self.model.mtp_forward(batch, input_ids, prev_hidden, kv_cache))
