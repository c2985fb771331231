"""One TP rank's model, paged KV cache and KV links; runs step plans (every worker process).

The leader (rank 0) calls `lead(plan)`: the plan's bytes go to every follower, then all ranks
run the same `run(plan)`: link ops that prepare (connect, recv, wait, drain) first, then the
forward, then the sends (they read KV the forward just wrote). Followers sit in `follow()`.
Returns the runner's ForwardOutput (logits [R, V] fp32, hidden [T, H]) or None without a forward.
The decode overlap loop chains steps on the device: a plan's `prev_rows` take inputs from the
previous step's sampled ids (`last_tokens`, every rank's copy from `share_tokens`).
"""

from __future__ import annotations

import logging

import torch

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.kvcache.link import LinkSignature
from glmserve.shared.protocol import unpack_ids
from glmserve.shared.runner.sampler import host_to_device
from glmserve.shared.worker_common.config import WorkerConfig
from glmserve.shared.worker_common.expert_stats import ExpertWindow
from glmserve.shared.worker_common.kv_budget import kv_pages_on_device
from glmserve.shared.worker_common.links import LinkSet
from glmserve.shared.worker_common.plan import StepPlan, decode_plan, encode_plan, prompt_mtp_batch, to_batch
from glmserve.shared.worker_common.tp import TPFanout

log = logging.getLogger(__name__)

def load_runner(cfg: WorkerConfig, tp_rank: int):
    """The model runner of this rank (shared.runner.model_runner, written by the model part)."""
    from glmserve.shared.model.parallel import TPGroup
    from glmserve.shared.runner.model_runner import ModelRunner

    return ModelRunner(
        cfg.model_dir,
        device=cfg.device_for_rank(tp_rank),
        dtype=cfg.dtype,
        tp=TPGroup(tp_rank, cfg.tp_size),
        load_format=cfg.load_format,
        quantization=cfg.quantization,
        fuse_shared_experts=cfg.fuse_shared_experts,
        with_mtp=True,  # when the checkpoint has it: the KV layout (and link signature) is then the
        # same on every worker whatever --mtp_step says, and prefills always fill the MTP-layer KV
    )


class Engine:
    def __init__(self, cfg: WorkerConfig, fanout: TPFanout):
        self.cfg = cfg
        self.fanout = fanout
        self.tp_rank = fanout.tp_rank
        self.device = torch.device(cfg.device_for_rank(self.tp_rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.runner = load_runner(cfg, self.tp_rank)
        # before any CUDA graph is captured, so the graphs count too (the leader alone: routing is replicated)
        self.experts = ExpertWindow(self.runner) if cfg.expert_stats and self.tp_rank == 0 else None
        layout = self.runner.kv_layout(cfg.page_size)
        if cfg.mtp_step and not self.runner.has_mtp:
            raise ValueError(f"--mtp_step {cfg.mtp_step}: the checkpoint has no MTP layer (num_nextn_predict_layers = 0)")
        # a prefill's cache is mapped by its decodes under the ipc transport (on CPU: shared memory)
        shareable = cfg.role == "prefill" and cfg.kv_transport in ("ipc", "cuda_ipc")
        self.num_pages = self._num_pages(layout)
        self.cache = PagedKVCache(layout, self.num_pages, self.device, shareable=shareable)
        mc = self.runner.config
        model_name = f"{mc.model_type}/L{mc.num_hidden_layers}/H{mc.hidden_size}/V{mc.vocab_size}"
        self.last_tokens: torch.Tensor | None = None  # [R] int64: the last share_tokens step's sampled ids
        self.links = LinkSet(cfg.role, cfg.worker_id, self.tp_rank, cfg.tp_size, self.cache,
                             LinkSignature.for_cache(model_name, layout, cfg.tp_size),
                             hidden_size=mc.hidden_size, hidden_dtype=self.runner.dtype,
                             transport=cfg.kv_transport)

    def _num_pages(self, layout) -> int:
        """--num_pages, or on cuda with --gpu_memory_utilization the pages that fit its share of the GPU
        (every TP rank the same: the fewest any rank fits)."""
        cfg = self.cfg
        if not cfg.gpu_memory_utilization or self.device.type != "cuda":
            return cfg.num_pages
        page_bytes = layout.page_bytes()
        pages = kv_pages_on_device(self.device, page_bytes, cfg.gpu_memory_utilization)
        if cfg.tp_size > 1:
            t = torch.tensor([pages], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.runner.tp.group)
            pages = int(t.item())
        log.info("KV cache: %d pages (%.1f GiB) from --gpu_memory_utilization %.2f", pages,
                 pages * page_bytes / (1 << 30), cfg.gpu_memory_utilization)
        return pages

    def lead(self, plan: StepPlan, prev_hidden: torch.Tensor | None = None):
        """prev_hidden [T, H]: a DRAFT plan's target hidden states, one row per plan token (held by
        the leader; `run` broadcasts them to the followers)."""
        assert self.tp_rank == 0
        if self.cfg.tp_size > 1:
            self.fanout.share(encode_plan(plan))
        return self.run(plan, prev_hidden)

    def follow(self) -> None:
        """Follower loop: run every plan rank 0 shares until a stop plan (or the leader dies)."""
        while True:
            plan = decode_plan(self.fanout.share(None))
            if plan.stop:
                return
            self.run(plan)

    def run(self, plan: StepPlan, prev_hidden: torch.Tensor | None = None):
        if plan.graphs is not None:
            g = plan.graphs
            self.capture_graphs(g.max_batch_size, g.max_seq_len, g.tokens_per_seq)
        # link ops run outside inference mode: the link's completion thread writes their buffers
        for op in plan.link_ops:
            if op.kind != "send":
                self.links.apply(op, None)
        out = None
        if plan.mode:
            batch = to_batch(plan, self.cfg.page_size, self.device)
            if plan.prev_rows:
                batch.input_ids = self._chained_inputs(plan.prev_rows, batch.input_ids)
            with torch.inference_mode():
                if plan.mode == "draft":
                    prev_hidden = self._share_hidden(prev_hidden, batch.input_ids.numel())
                    out = self.runner.mtp_forward(batch, batch.input_ids, prev_hidden, self.cache)
                else:
                    out = self.runner.forward(batch, self.cache)
                    mtp = prompt_mtp_batch(plan, self.cfg.page_size, self.device) if self.runner.has_mtp else None
                    if mtp is not None:  # the prompt's MTP-layer KV, pushed with the other layers
                        self.runner.mtp_forward(mtp[0], mtp[0].input_ids, out.hidden[mtp[1]], self.cache)
        for op in plan.link_ops:
            if op.kind == "send":
                self.links.apply(op, out.hidden if out is not None else None)
        if plan.share_tokens and self.tp_rank > 0:
            self.last_tokens = torch.empty(len(plan.seqs), dtype=torch.int64, device=self.device)
            torch.distributed.broadcast(self.last_tokens, 0)  # pairs with the leader's share_tokens
        return out

    def share_tokens(self, ids: torch.Tensor) -> None:
        """Leader, after sampling a `share_tokens` plan's rows: ids [R] int64 on the device become
        every rank's `last_tokens` (one broadcast over the TP group; no host sync)."""
        assert self.tp_rank == 0
        if self.cfg.tp_size > 1:
            torch.distributed.broadcast(ids, 0)
        self.last_tokens = ids

    def _chained_inputs(self, prev_rows: bytes, host_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] of an overlap DECODE plan: row r of the previous step's sampled tokens where
        prev_rows[i] = r >= 0, else the plan's own id (a request that was not in that step)."""
        rows = host_to_device(torch.tensor(unpack_ids(prev_rows), dtype=torch.int64), self.device)
        assert self.last_tokens is not None and rows.numel() == host_ids.numel()
        return torch.where(rows >= 0, self.last_tokens[rows.clamp(min=0)], host_ids)

    def _share_hidden(self, hidden: torch.Tensor | None, num_rows: int) -> torch.Tensor:
        """TP > 1: the leader's DRAFT input hidden [num_rows, H] on every rank (one broadcast over
        the TP group, NCCL on GPU; the step's collectives pair up because every rank runs the same
        plan). The MTP bookkeeping stays on the leader; followers only need the rows."""
        if self.cfg.tp_size == 1:
            return hidden
        h = self.runner.config.hidden_size
        if self.tp_rank == 0:
            assert hidden is not None and tuple(hidden.shape) == (num_rows, h), (None if hidden is None else hidden.shape)
            buf = hidden.to(device=self.device, dtype=self.runner.dtype).contiguous()
        else:
            buf = torch.empty(num_rows, h, dtype=self.runner.dtype, device=self.device)
        torch.distributed.broadcast(buf, 0)
        return buf

    def capture_graphs(self, max_batch_size: int, max_seq_len: int, tokens_per_seq: int = 1) -> list[int]:
        """Graph buckets over this rank's cache: DECODE (tokens_per_seq 1), or for MTP (q = K + 1) VERIFY
        of q tokens, DRAFT of q rows (the first draft pass, padded by decode_worker.mtp) and DRAFT of 1 row
        (the chained drafts, K > 1). Every rank runs it from the same plan, so the collectives inside the
        captured forwards pair up. CPU: no capture, the padded path runs eagerly."""
        from glmserve.shared.runner.batch import ForwardMode

        q = tokens_per_seq
        sets = [(ForwardMode.DECODE, 1)] if q == 1 else [(ForwardMode.VERIFY, q)]
        if q > 1 and self.runner.has_mtp:
            sets += [(ForwardMode.DRAFT, q)] + ([(ForwardMode.DRAFT, 1)] if q > 2 else [])
        for mode, n in sets:
            sizes = self.runner.capture_decode_graphs(self.cache, max_batch_size, max_seq_len, tokens_per_seq=n,
                                                      mode=mode)
            log.info("rank %d: %s q=%d graphs for batch %s, seq len <= %d (%s)", self.tp_rank, mode.value, n,
                     sizes, max_seq_len, "captured" if self.device.type == "cuda" else "padded eager on cpu")
        return sizes

    def stop(self) -> None:
        if self.tp_rank == 0 and self.cfg.tp_size > 1:
            self.fanout.share(encode_plan(StepPlan(mode="", stop=True)))
        self.links.close_all()
