"""MTP step timing at the real GLM-4.7-Flash config, dummy weights, one GPU (run by hand / the lead).

    python -m bench.mtp_step --out mtp_step.json [--device cuda] [--ctx 512] [--batches 1,16,64,128]
        [--ks 1,2,3] [--iters 10] [--config deploy/model_configs/glm-4.7-flash.json]

For each batch size B it times, with every sequence holding --ctx tokens of (zero) KV:
  decode   one DECODE forward, 1 token per sequence (plain decoding's step)
  verify   one VERIFY forward over K + 1 tokens per sequence, logits at every row
  draft    K MTP-layer forwards (DRAFT mode): the first over 1 row per sequence, then K - 1 chained
and projects decode throughput for per-token acceptance a in {0.5, 0.7, 0.9} (drafts accepted
independently with probability a, the first rejection ends the run):
  tokens/step = sum_{i=0..K} a^i;   projected tok/s = B * tokens/step / (draft + verify)
next to the measured plain tok/s = B / decode. Projections are marked "projected": only step times
are measured. Then it measures the first-draft acceptance on the random weights (teacher-forced:
MTP argmax at row p vs the target argmax at row p + 1 over random prompts); expect ~0 (1/V chance).
Output: a table on stdout and JSON at --out. Needs about 70 GB of GPU memory at --ctx 512.
--graphs: every step replays CUDA graphs as the decode worker does (buckets captured per batch size:
DECODE, VERIFY of K + 1, the first DRAFT pass padded to K + 1 rows per sequence, chained DRAFT of 1 row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from bench.profile_step import experts_touched, touched_summary
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner

PAGE = 16
ACCEPT_RATES = (0.5, 0.7, 0.9)
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "glmserve", "deploy", "model_configs", "glm-4.7-flash.json")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of fn() over iters runs after 2 warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _batch(mode: ForwardMode, b: int, n_new: int, ctx: int, vocab: int, device, rows: str) -> ForwardBatch:
    """b sequences, each with ctx cached tokens and n_new new ones; sequence i owns its own pages."""
    per_seq = -(-(ctx + n_new) // PAGE)
    g = torch.Generator().manual_seed(b * 31 + n_new)
    seqs = [(torch.randint(3, vocab, (n_new,), generator=g).tolist(), ctx,
             list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(b)]
    return ForwardBatch.build(mode, seqs, PAGE, logits_rows=rows, device=device)


def _capture(runner: ModelRunner, kv: PagedKVCache, b: int, ks: list[int], max_seq_len: int) -> None:
    """The decode worker's graph sets for batch b (buckets up to b), replacing earlier ones."""
    runner.graph_sets.clear()
    torch.cuda.empty_cache()
    sets = [(ForwardMode.DECODE, 1), (ForwardMode.DRAFT, 1)]
    sets += [(m, k + 1) for k in ks for m in (ForwardMode.VERIFY, ForwardMode.DRAFT)]
    for mode, q in sets:
        runner.capture_decode_graphs(kv, b, max_seq_len, tokens_per_seq=q, mode=mode)


def time_batch(runner: ModelRunner, kv: PagedKVCache, b: int, ks: list[int], ctx: int, iters: int,
               graphs: bool = False) -> dict:
    dev, vocab, h = runner.device, runner.config.vocab_size, runner.config.hidden_size
    dec = _batch(ForwardMode.DECODE, b, 1, ctx, vocab, dev, "last")
    runner.graph_sets.clear()  # experts routed to, counted by one eager decode forward (random weights: ~uniform)
    touched = experts_touched(runner, dec, kv)
    if graphs:
        _capture(runner, kv, b, ks, ctx + max(ks) + 1)
    runs = runner.graph_runs()
    row = {"batch": b, "experts_touched": touched_summary(touched),
           "decode_s": _timed(lambda: runner.forward(dec, kv), dev, iters)}
    row["plain_tok_s"] = b / row["decode_s"]
    hidden = torch.randn(b, h, device=dev, dtype=runner.dtype)
    for k in ks:
        ver = _batch(ForwardMode.VERIFY, b, k + 1, ctx, vocab, dev, "all")
        drf = _batch(ForwardMode.DRAFT, b, 1, ctx, vocab, dev, "last")
        first = _batch(ForwardMode.DRAFT, b, k + 1 if graphs else 1, ctx, vocab, dev, "last")
        first_hidden = hidden.repeat_interleave(k + 1 if graphs else 1, 0)

        def draft_chain():
            z = runner.mtp_forward(first, first.input_ids, first_hidden, kv).hidden[: b]
            for _ in range(k - 1):  # the worker's chain: each draft feeds the MTP block's own output
                z = runner.mtp_forward(drf, drf.input_ids, z, kv).hidden

        t_ver = _timed(lambda: runner.forward(ver, kv), dev, iters)
        t_drf = _timed(draft_chain, dev, iters)
        step = t_ver + t_drf
        proj = {f"{a:.1f}": b * sum(a**i for i in range(k + 1)) / step for a in ACCEPT_RATES}
        row[f"k{k}"] = {"verify_s": t_ver, "draft_s": t_drf, "verify_over_decode": t_ver / row["decode_s"],
                        "projected_tok_s": proj,
                        "projected_speedup": {a: v / row["plain_tok_s"] for a, v in proj.items()}}
    row["graphs"] = graphs
    assert not graphs or runner.graph_runs() > runs, "--graphs: the steps did not replay graphs"
    return row


def measured_acceptance(runner: ModelRunner, kv: PagedKVCache, n_seqs: int = 8, prompt_len: int = 256) -> dict:
    """Teacher-forced first-draft acceptance on random prompts: MTP(h_p, x_{p+1}) vs target argmax at p+1."""
    dev, vocab = runner.device, runner.config.vocab_size
    g = torch.Generator().manual_seed(0)
    per_seq = -(-prompt_len // PAGE)
    seqs = [(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), 0,
             list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(n_seqs)]
    pre = ForwardBatch.build(ForwardMode.PREFILL, seqs, PAGE, logits_rows="all", device=dev)
    out = runner.forward(pre, kv)
    target = out.logits.argmax(-1).view(n_seqs, prompt_len)  # target's token after position p
    ids = pre.input_ids.view(n_seqs, prompt_len)
    # MTP rows p = 0..L-2 carry (h_p, x_{p+1}) and predict x_{p+2}, which the target predicts at p + 1
    rows = [(s[0][1:], 0, s[2]) for s in seqs]
    drf = ForwardBatch.build(ForwardMode.DRAFT, rows, PAGE, logits_rows="all", device=dev)
    keep = torch.arange(prompt_len, device=dev).repeat(n_seqs) % prompt_len < prompt_len - 1
    mtp = runner.mtp_forward(drf, ids[:, 1:].reshape(-1), out.hidden[keep], kv).logits.argmax(-1)
    agree = (mtp.view(n_seqs, prompt_len - 1) == target[:, 1:]).float().mean().item()
    return {"first_draft_acceptance": agree, "rows": n_seqs * (prompt_len - 1), "chance": 1.0 / vocab}


def _model_dir(config: str) -> str:
    d = tempfile.mkdtemp(prefix="mtp_step_")
    shutil.copyfile(config, os.path.join(d, "config.json"))
    return d


def _table(rows: list[dict], ks: list[int]) -> str:
    lines = [f"{'B':>4} {'experts/layer':>13} {'decode ms':>10} {'plain tok/s':>12}  " + "  ".join(
        f"K={k}: verify ms (x dec) draft ms | projected tok/s @50/70/90%" for k in ks)]
    for r in rows:
        cells = []
        for k in ks:
            c = r[f"k{k}"]
            p = c["projected_tok_s"]
            cells.append(f"{c['verify_s'] * 1e3:8.2f} ({c['verify_over_decode']:.2f}x) {c['draft_s'] * 1e3:7.2f} | "
                         + "/".join(f"{p[a]:.0f}" for a in ("0.5", "0.7", "0.9")) + " (projected)")
        lines.append(f"{r['batch']:>4} {r['experts_touched']:>13} {r['decode_s'] * 1e3:10.2f} "
                     f"{r['plain_tok_s']:12.0f}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mtp_step.json")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--graphs", action="store_true", help="replay CUDA graphs (the decode worker's default on cuda)")
    ap.add_argument("--acc_prompt_len", type=int, default=256, help="random prompt length of the acceptance check")
    a = ap.parse_args(argv)
    batches, ks = [int(x) for x in a.batches.split(",")], [int(x) for x in a.ks.split(",")]
    t0 = time.time()
    runner = ModelRunner(_model_dir(a.config), device=a.device, dtype=a.dtype, load_format="dummy", with_mtp=True)
    assert runner.has_mtp, "the config has no MTP layer"
    per_seq = -(-(a.ctx + max(ks) + 1) // PAGE)
    acc_pages = 8 * -(-a.acc_prompt_len // PAGE)  # measured_acceptance: 8 prompts
    kv = PagedKVCache(runner.kv_layout(PAGE), 1 + max(max(batches) * per_seq, acc_pages), runner.device)
    load_s = time.time() - t0
    with torch.no_grad():
        rows = [time_batch(runner, kv, b, ks, a.ctx, a.iters, a.graphs) for b in batches]
        runner.graph_sets.clear()
        acc = measured_acceptance(runner, kv, 8, a.acc_prompt_len)
    result = {"model": "GLM-4.7-Flash config, dummy weights", "device": str(runner.device),
              "gpu": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
              "dtype": a.dtype, "ctx": a.ctx, "graphs": a.graphs, "page_size": PAGE, "load_s": load_s, "rows": rows,
              "acceptance_random_weights": acc, "total_s": time.time() - t0,
              "note": "projected_* = measured step times x an assumed per-token acceptance; not measured throughput"}
    print(_table(rows, ks))
    print(f"measured first-draft acceptance on random weights: {acc['first_draft_acceptance']:.4f} "
          f"(chance {acc['chance']:.2e}; expected ~0 with random weights)")
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
