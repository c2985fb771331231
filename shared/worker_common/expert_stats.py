"""Experts touched per MoE layer over each heartbeat window (worker leader, `--expert_stats`).

Runs on the leader's main thread at heartbeat time. The model counts tokens routed to each expert
on the device (ModelRunner.track_expert_usage: one scatter_add per MoE layer per forward, captured in
the decode's CUDA graphs); each `window()` call copies the [layers, E] counts to pinned host memory
without blocking and reads the copy launched by the call before, so no heartbeat waits for the GPU
(the figures lag one heartbeat). Per layer and window: experts that got >= 1 token, and the busiest
expert's share of the layer's routed tokens. Dummy weights can pin every token to a few experts,
which would make a benchmark read a fraction of the expert weights a real checkpoint reads
(DESIGN §7): these gauges show it. CUDA-graph pad rows are routed too (at most top-k experts more).
Layers are the model's decoder layers by index; an MTP layer, which sits at index num_hidden_layers,
is reported where it runs (a prefill fills its KV; a decode with --mtp_step drafts with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.shared.runner.model_runner import ModelRunner


@dataclass(frozen=True)
class LayerWindow:
    layer: int
    touched: int  # experts with >= 1 routed token in the window
    max_share: float  # the busiest expert's tokens / the layer's routed tokens (1 / E when uniform)
    tokens: int  # (token, expert) pairs routed in the window


class ExpertWindow:
    def __init__(self, runner: ModelRunner):
        runner.track_expert_usage()
        self.counts = runner.expert_counts_all  # [L_moe, S] int64, on the model's device (S >= E slots)
        self.num_experts = runner.config.n_routed_experts  # routed experts: the counts' first E columns
        self.layers = runner.moe_layer_indices()
        pin = self.counts.device.type == "cuda"
        self._host = [torch.zeros_like(self.counts, device="cpu", pin_memory=pin) for _ in range(2)]
        self._event: torch.cuda.Event | None = None
        self._turn = 0  # which host buffer the next copy fills
        self._last = torch.zeros_like(self._host[0])  # the counts at the end of the previous window

    def window(self) -> list[LayerWindow]:
        """The window that ended at the previous call's copy (on CPU: at this call); [] while none is
        ready. Layers without tokens in the window are left out."""
        ready = None
        if self.counts.device.type == "cuda":
            if self._event is not None and self._event.query():
                ready = self._host[1 - self._turn]
            if self._event is None or ready is not None:
                self._host[self._turn].copy_(self.counts, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
                self._turn = 1 - self._turn
        else:
            ready = self._host[0]
            ready.copy_(self.counts)
        if ready is None:
            return []
        delta = ready - self._last
        self._last = ready.clone()
        out = []
        for row, layer in enumerate(self.layers):
            d = delta[row, : self.num_experts]
            total = int(d.sum())
            if total > 0:
                out.append(LayerWindow(layer, int((d > 0).sum()), float(d.max()) / total, total))
        return out
