"""ModelRunner: config + weights + model on one device/dtype/TP rank (every rank of prefill and decode workers).

It owns only the model; the KV cache (`PagedKVCache`, built from `kv_layout()`) and the batches belong to
the caller. `forward(batch, kv_cache)` writes the batch tokens' KV into their slots and returns
ForwardOutput(logits [R, V] fp32 full vocab at batch.logits_indices, hidden [T, H] after the final norm).
`mtp_forward` runs the checkpoint's MTP layer (cache layer num_hidden_layers), spec §3.2.
`capture_decode_graphs` records CUDA graphs of DECODE steps per batch bucket (`DecodeGraphs`, below), or of
VERIFY / DRAFT steps with a fixed number of tokens per sequence (MTP); `forward` and `mtp_forward` replay
them for the batches that fit and run the rest eagerly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from glmserve.shared.config.model import ModelConfig
from glmserve.shared.kvcache.cache import KVLayout
from glmserve.shared.model.attention_layout import kv_layout_for
from glmserve.shared.model.context import BuildCtx
from glmserve.shared.model.layers.moe import MoE
from glmserve.shared.model.parallel import SINGLE, TPGroup
from glmserve.shared.model.registry import model_class
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.weights.dummy import init_dummy
from glmserve.shared.weights.fp8 import fp8_policy
from glmserve.shared.weights.loader import load_checkpoint

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
        fuse_shared_experts: bool = True,
    ):
        """load_format: "auto" (safetensors in model_dir) | "dummy" (random weights, realistic routing).
        quantization: None (as the checkpoint is) | "fp8" (quantize a float checkpoint at load).
        fuse_shared_experts: the MoE's shared expert runs as the fused experts' last slot (layers/moe.py)."""
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format {load_format!r}: expected auto or dummy")
        self.config = ModelConfig.from_dir(model_dir)
        self.device, self.dtype, self.tp = torch.device(device), to_dtype(dtype), tp
        if self.device.type == "cuda":  # Triton kernels for CUDA tensors; CPU keeps the torch refs
            from glmserve.kernels.backend import install

            install()
        policy = fp8_policy(self.config, model_dir if load_format == "auto" else None, quantization)
        ctx = BuildCtx(tp=tp, dtype=self.dtype, device=self.device, fp8_modules=policy,
                       fuse_shared_experts=fuse_shared_experts)
        self.model = model_class(self.config)(self.config, ctx, with_mtp=with_mtp).eval()
        self.num_mtp_layers = self.model.num_mtp_layers
        self.graph_sets: dict[tuple[ForwardMode, int], DecodeGraphs] = {}  # (mode, tokens per seq) -> graphs
        if load_format == "dummy":
            init_dummy(self.model, self.config, seed)
        else:
            q = self.config.quantization
            block = q.weight_block_size if q is not None and q.weight_strategy == "block" else None
            load_checkpoint(self.model, model_dir, self.config.num_hidden_layers, self.num_mtp_layers, block)
        for m in self.model.modules():  # derived weights (e.g. MLA's dequantized absorbed projections)
            if hasattr(m, "after_load"):
                m.after_load()

    @property
    def has_mtp(self) -> bool:
        return self.num_mtp_layers > 0

    def kv_layout(self, page_size: int, dtype: torch.dtype | None = None) -> KVLayout:
        """Cache layout for this rank: main layers plus the MTP layer when it is loaded."""
        return kv_layout_for(self.config, self.tp.tp_size, page_size, dtype or self.dtype,
                             self.config.num_hidden_layers + self.num_mtp_layers)

    def track_expert_usage(self, enabled: bool = True) -> None:
        """Start (and zero) or stop counting tokens routed to each expert of every MoE layer. The counts
        of model.model.layers' MoE layers are rows of one [num MoE layers, S] tensor
        (`expert_counts_all`, rows in moe_layer_indices order), so one copy reads them all; any other
        MoE module gets its own. Set before CUDA graphs are captured for the graphs to count. Rows have
        one column per expert slot (a fused shared expert's last: every token); readers take [:, :E]."""
        e = max((m.num_slots for m in self.model.modules() if isinstance(m, MoE)), default=1)  # S
        rows = {id(self.model.model.layers[i].mlp): r for r, i in enumerate(self.moe_layer_indices())}
        self.expert_counts_all = torch.zeros(len(rows), e, dtype=torch.int64, device=self.device) if enabled else None
        for m in self.model.modules():
            if isinstance(m, MoE):
                if not enabled:
                    m.expert_counts = None
                elif id(m) in rows:
                    m.expert_counts = self.expert_counts_all[rows[id(m)]]
                else:
                    m.expert_counts = torch.zeros(e, dtype=torch.int64, device=self.device)

    def moe_layer_indices(self) -> list[int]:
        """Indices of the MoE layers in model.model.layers (an MTP layer there too), in the row order of
        `expert_counts_all`."""
        return [i for i, layer in enumerate(self.model.model.layers) if isinstance(layer.mlp, MoE)]

    def expert_usage(self) -> dict[int, torch.Tensor]:
        """{layer index: [E] tokens routed per expert} since track_expert_usage (benchmarks print it)."""
        e = self.config.n_routed_experts
        return {i: layer.mlp.expert_counts[:e].cpu() for i, layer in enumerate(self.model.model.layers)
                if isinstance(layer.mlp, MoE) and layer.mlp.expert_counts is not None}

    @torch.no_grad()  # not inference_mode: callers may update the outputs in place
    def forward(self, batch: ForwardBatch, kv_cache) -> ForwardOutput:
        graphs = self._graphs_for(batch, kv_cache, draft=False)
        return graphs.run(batch) if graphs is not None else self._eager(batch, kv_cache)

    def _graphs_for(self, batch: ForwardBatch, kv_cache, draft: bool) -> "DecodeGraphs | None":
        """The graph set this batch fits (DRAFT sets only for mtp_forward, the others only for forward)."""
        return next((g for (mode, _), g in self.graph_sets.items()
                     if (mode == ForwardMode.DRAFT) == draft and g.fits(batch, kv_cache)), None)

    @property
    def graphs(self) -> "DecodeGraphs | None":
        """The DECODE graphs (None before capture_decode_graphs)."""
        return self.graph_sets.get((ForwardMode.DECODE, 1))

    def _eager(self, batch: ForwardBatch, kv_cache) -> ForwardOutput:
        hidden = self.model(batch, kv_cache)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        return ForwardOutput(logits, hidden)

    def capture_decode_graphs(self, kv_cache, max_batch_size: int, max_seq_len: int, dummy_page: int = 0,
                              tokens_per_seq: int = 1, mode: ForwardMode | None = None) -> list[int]:
        """Capture CUDA graphs of DECODE steps for batch buckets up to max_batch_size (all TP ranks together);
        tokens_per_seq q > 1: of VERIFY steps with exactly q tokens per sequence instead; mode DRAFT: of
        `mtp_forward` over q rows per sequence (logits at every row; callers pick theirs by logits_indices).

        Later batches that fit (that mode, <= max_batch_size seqs, seq lens <= max_seq_len, this kv_cache) are
        padded to the next bucket and replayed; pad rows write only `dummy_page` (the allocator's reserved
        page 0; it must hold >= q slots). On CPU nothing is captured, but the padded path runs eagerly (so
        tests cover it). Returns the bucket sizes."""
        mode = mode or (ForwardMode.DECODE if tokens_per_seq == 1 else ForwardMode.VERIFY)
        graphs = DecodeGraphs(self, kv_cache, max_batch_size, max_seq_len, dummy_page, tokens_per_seq, mode)
        self.graph_sets[(mode, tokens_per_seq)] = graphs
        return graphs.sizes

    def graph_runs(self) -> int:
        """Batches run through graph buckets so far (every mode)."""
        return sum(g.num_runs for g in self.graph_sets.values())

    @torch.no_grad()  # not inference_mode: callers may update the outputs in place
    def mtp_forward(self, batch: ForwardBatch, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                    kv_cache) -> ForwardOutput:
        """Draft: row t carries target hidden prev_hidden[t] (position batch.positions[t]) and the next token
        input_ids[t]. Returns (logits [R, V] of the token after input_ids, hidden [T, H] pre shared_head.norm)."""
        graphs = self._graphs_for(batch, kv_cache, draft=True) if input_ids is batch.input_ids else None
        if graphs is not None:
            return graphs.run(batch, prev_hidden)
        return self._mtp_eager(batch, input_ids, prev_hidden, kv_cache)

    def _mtp_eager(self, batch: ForwardBatch, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                   kv_cache) -> ForwardOutput:
        return ForwardOutput(*self.model.mtp_forward(batch, input_ids, prev_hidden, kv_cache))


def graph_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (and max_batch_size itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Static inputs (max-bucket buffers; bucket g uses the first g sequences = g * q tokens) and one graph
    per bucket. q = tokens per sequence: DECODE q = 1, VERIFY q = K + 1; DRAFT runs the MTP layer with a
    static prev_hidden [g * q, H] too. The static batch wants logits at every row."""

    def __init__(self, runner: ModelRunner, kv_cache, max_batch_size: int, max_seq_len: int, dummy_page: int,
                 q: int = 1, mode: ForwardMode = ForwardMode.DECODE):
        dev, page = runner.device, kv_cache.layout.page_size
        assert 1 <= q <= page, "pad rows keep their q tokens inside the dummy page"
        assert mode != ForwardMode.PREFILL and (q == 1 or mode != ForwardMode.DECODE)
        self.runner, self.kv_cache, self.max_seq_len, self.page_size, self.q = runner, kv_cache, max_seq_len, page, q
        self.mode = mode
        self.max_pages, self.dummy_slot = -(-max_seq_len // page), dummy_page * page
        self.sizes = graph_buckets(max_batch_size)
        n, t = max_batch_size, max_batch_size * q
        i64 = dict(dtype=torch.int64, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        self.ids, self.pos = torch.zeros(t, **i64), torch.zeros(t, **i64)  # [t] tokens of the bucket
        self.slots = torch.full((t,), self.dummy_slot, **i64)
        self.offsets = torch.arange(q, **i64).repeat(n)  # [t] token index inside its sequence
        self.table = torch.full((n, self.max_pages), dummy_page, **i32)
        self.prefix, self.qlens = torch.zeros(n, **i32), torch.full((n,), q, **i32)
        self.seq_lens, self.qsl = torch.full((n,), q, **i32), torch.arange(0, (n + 1) * q, q, **i32)
        self.rows = torch.arange(t, **i64)  # logits rows: every token (q = 1: every sequence)
        self.hidden = torch.zeros(t if mode == ForwardMode.DRAFT else 0, runner.config.hidden_size,
                                  dtype=runner.dtype, device=dev)  # DRAFT: prev_hidden [t, H]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, ForwardOutput]] = {}
        self.num_runs = 0  # batches run through `run` (replayed on CUDA, padded eager on CPU)
        if dev.type == "cuda":
            self._capture_all()

    def _static_batch(self, g: int, prefix_cpu: list[int]) -> ForwardBatch:
        t = g * self.q
        return ForwardBatch(self.mode, self.ids[:t], self.pos[:t], self.qlens[:g], self.prefix[:g],
                            self.seq_lens[:g], self.qsl[: g + 1], self.table[:g], self.slots[:t], self.rows[:t],
                            [self.q] * g, prefix_cpu)

    @torch.no_grad()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for g in sorted(self.sizes, reverse=True):  # largest first: smaller ones reuse its pool memory
            batch = self._static_batch(g, [self.max_seq_len - self.q] * g)  # host lens size the attention grid
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(batch)
            self.graphs[g] = (graph, out)

    def _forward(self, batch: ForwardBatch) -> ForwardOutput:
        if self.mode == ForwardMode.DRAFT:
            return self.runner._mtp_eager(batch, batch.input_ids, self.hidden[: batch.num_tokens], self.kv_cache)
        return self.runner._eager(batch, self.kv_cache)

    def fits(self, batch: ForwardBatch, kv_cache) -> bool:
        return (batch.mode == self.mode and kv_cache is self.kv_cache and 0 < batch.num_seqs <= self.sizes[-1]
                and all(n == self.q for n in batch.query_lens_cpu)
                and max(batch.prefix_lens_cpu) + self.q <= self.max_seq_len)

    def run(self, batch: ForwardBatch, prev_hidden: torch.Tensor | None = None) -> ForwardOutput:
        """Pad the batch to its bucket, replay (CUDA) or run the padded batch eagerly (CPU).
        Pad sequences: prefix 0, q tokens at positions 0..q-1, KV written to the dummy slot only.
        prev_hidden [b * q, H]: DRAFT batches' target hidden (pad rows keep stale, finite rows)."""
        b = batch.num_seqs
        g = next(size for size in self.sizes if size >= b)
        tb, tg = b * self.q, g * self.q
        self.num_runs += 1
        cols = min(batch.page_table.shape[1], self.max_pages)
        self.ids[:tb].copy_(batch.input_ids)
        self.pos[:tb].copy_(batch.positions)
        self.pos[tb:tg].copy_(self.offsets[tb:tg])
        self.slots[:tb].copy_(batch.slot_mapping)
        self.slots[tb:tg].fill_(self.dummy_slot)
        self.table[:g].fill_(self.dummy_slot // self.page_size)
        self.table[:b, :cols].copy_(batch.page_table[:, :cols])
        self.prefix[:b].copy_(batch.prefix_lens)
        self.prefix[b:g].zero_()
        torch.add(self.prefix[:g], self.q, out=self.seq_lens[:g])
        if self.mode == ForwardMode.DRAFT:
            self.hidden[:tb].copy_(prev_hidden)
        if g in self.graphs:
            graph, out = self.graphs[g]
            graph.replay()
        else:
            out = self._forward(self._static_batch(g, batch.prefix_lens_cpu + [0] * (g - b)))
        # the index gather is already a copy of the static logits (a .clone() on it moved [R, V] fp32 twice:
        # ~100 us a step at B 256); hidden[:tb] is a view of the static buffer, so it is cloned
        return ForwardOutput(out.logits[batch.logits_indices], out.hidden[:tb].clone())
