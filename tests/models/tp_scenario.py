"""A fixed model workload (prefill, decode steps, MTP draft) run at any TP size; used by the TP tests
in-process (TP=1) and in spawned gloo/NCCL ranks (TP=N)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.model.parallel import SINGLE, TPGroup
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
PAGE = 4


def run_workload(model_dir: str, tp: TPGroup = SINGLE, device: str = "cpu", dtype=torch.float32,
                 **runner_kw) -> dict[str, torch.Tensor]:
    runner = ModelRunner(model_dir, device=device, dtype=dtype, tp=tp, **runner_kw)
    kv = PagedKVCache(runner.kv_layout(PAGE), 64, device)
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(PROMPTS))]
    out: dict[str, torch.Tensor] = {}
    res = runner.forward(ForwardBatch.build(ForwardMode.PREFILL, [(p, 0, t) for p, t in zip(PROMPTS, tables)],
                                            PAGE, device=device), kv)
    out["prefill_logits"], out["prefill_hidden"] = res.logits.cpu(), res.hidden.float().cpu()
    seqs = [list(p) for p in PROMPTS]
    vocab = runner.config.vocab_size
    for it in range(3):  # fixed decode tokens: runs that differ slightly (bf16, fp8) still see the same inputs
        toks = [(17 * (it + 1) + 5 * i) % vocab for i in range(len(seqs))]
        batch = ForwardBatch.build(ForwardMode.DECODE, [([t], len(s), tb) for s, t, tb in zip(seqs, toks, tables)],
                                   PAGE, device=device)
        for s, t in zip(seqs, toks):
            s.append(t)
        prev_hidden = res.hidden
        res = runner.forward(batch, kv)
        out[f"decode{it}_logits"] = res.logits.cpu()
    if runner.has_mtp:
        draft = runner.mtp_forward(batch, batch.input_ids, prev_hidden, kv)  # rows: h of the previous step
        out["draft_logits"] = draft.logits.cpu()
    return out


def tp_rank_main(rank: int, world: int, port: int, cases: list[tuple[str, str]], device: str) -> None:
    """Spawned rank: run every (model_dir, result_path) case; rank 0 saves its results."""
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dev = f"cuda:{rank}" if device == "cuda" else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for model_dir, path in cases:
            res = run_workload(model_dir, TPGroup(rank, world, None), dev, dtype)
            torch.save(res, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()
