"""KV-link throughput: the pages of 1k-, 4k- and 16k-token prompts, next to plain send/recv.

Two processes (this one = prefill on the first GPU, a child = decode on the second), one
KVLink between them built by the real rendezvous (signature check, warm-up). For each prompt
size it times, median of --reps:
- link:  post send_pages (gather of every layer -> one send) until the decode's ack arrives; the
         decode recv_pages (recv -> header check -> scatter) then acks with a 4-byte send_tensor.
- plain: the same bytes as one raw send/recv on the same process group, then a raw 4-byte ack;
         the ceiling the link is compared with (measured in the same run, as DESIGN §7 asks).
It also checks the bytes arrived (float64 sum of the pages on both ends).

GPU (the lead): `python -m bench.kv_transfer --device cuda --gpus 0,1 --out kv_transfer.json`
  (GLM-4.7-Flash layout: 47 layers + MTP = 48, MLA 576 entries, bf16, page 16; < 2 minutes).
CPU smoke (gloo): `python -m bench.kv_transfer --device cpu --tokens 64,256 --num_layers 4 --reps 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

from shared.kvcache.cache import KVLayout, PagedKVCache
from shared.kvcache.link import LinkSignature, XferState
from shared.kvcache.rendezvous import accept_link, connect_link, open_store

MODEL = "glm4_moe_lite (GLM-4.7-Flash layout)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gpus", default="0,1", help="prefill GPU, decode GPU")
    p.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths")
    p.add_argument("--num_layers", "--num-layers", type=int, default=48, help="47 layers + the MTP layer")
    p.add_argument("--entry_dim", "--entry-dim", type=int, default=576, help="kv_lora_rank 512 + rope 64")
    p.add_argument("--page_size", "--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="", help="JSON results file")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--role", default="prefill", choices=["prefill", "decode"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def layout_of(a: argparse.Namespace) -> KVLayout:
    return KVLayout(a.num_layers, 1, a.page_size, 1, a.entry_dim, getattr(torch, a.dtype))


def sizes(a: argparse.Namespace) -> list[tuple[int, int]]:
    """(tokens, pages) per prompt length."""
    return [(t, -(-t // a.page_size)) for t in (int(x) for x in a.tokens.split(","))]


def device_of(a: argparse.Namespace) -> str:
    if a.device == "cpu":
        return "cpu"
    gpus = [int(g) for g in a.gpus.split(",")]
    return f"cuda:{gpus[0] if a.role == 'prefill' else gpus[1]}"


def page_ids(num_pages: int, n: int, seed: int, device: str) -> torch.Tensor:
    """n distinct pages in a shuffled order (a real request's pages are not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_pages, generator=g)[:n].to(device)


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)


def run_side(a: argparse.Namespace) -> list[dict]:
    dev, lay = device_of(a), layout_of(a)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    num_pages = max(p for _, p in sizes(a)) + 1
    cache = PagedKVCache(lay, num_pages, dev)
    sig = LinkSignature.for_cache(MODEL, lay, tp_size=1)
    if a.role == "prefill":
        store = open_store("127.0.0.1", a.port, is_host=False, timeout_s=120)
        link = connect_link(store, "bench-p", "bench-d", 0, sig, dev, timeout_s=120, xfer_timeout_s=120)
        cache.buffer.normal_(generator=torch.Generator(dev).manual_seed(0))
    else:
        store = open_store("127.0.0.1", a.port, is_host=True, timeout_s=120)
        link = accept_link(store, "bench-p", "bench-d", 0, sig, dev, timeout_s=120, xfer_timeout_s=120)
    rows = [measure(a, link, cache, tokens, n, dev) for tokens, n in sizes(a)]
    link.close()
    return rows


def measure(a, link, cache: PagedKVCache, tokens: int, n: int, dev: str) -> dict:
    sender = a.role == "prefill"
    ids = page_ids(cache.num_pages, n, seed=1 if sender else 2, device=dev)
    nbytes = n * cache.layout.page_bytes()
    ack = torch.zeros(1, dtype=torch.int32, device=dev)
    link_s, plain_s = [], []
    for rep in range(a.reps + 1):  # rep 0 warms buffers and the allocator
        x = f"t{tokens}/r{rep}"
        sync(dev)
        t0 = time.perf_counter()
        if sender:
            link.send_pages(x, cache, ids)
            link.recv_tensor(x + "/ack", ack)
            assert link.wait(x + "/ack", 120) is XferState.DONE, link.error
        else:
            link.recv_pages(x, cache, ids)
            assert link.wait(x, 120) is XferState.DONE, link.error
            link.send_tensor(x + "/ack", ack)
            assert link.wait(x + "/ack", 120) is XferState.DONE, link.error
        dt = time.perf_counter() - t0
        link.forget(x), link.forget(x + "/ack")
        if rep:
            link_s.append(dt)
    checksum = float(cache.buffer.index_select(2, ids).double().sum())
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    for rep in range(a.reps + 1):
        plain_s.append(plain_once(link.pg, sender, buf, ack, dev))
    row = {"tokens": tokens, "pages": n, "bytes": nbytes, "checksum": checksum,
           "link_s": statistics.median(link_s), "plain_s": statistics.median(plain_s[1:])}
    del buf
    return row


def plain_once(pg, sender: bool, buf: torch.Tensor, ack: torch.Tensor, dev: str) -> float:
    """One raw send of buf plus a raw ack back, on the link's own process group."""
    peer = 1 if sender else 0
    sync(dev)
    t0 = time.perf_counter()
    if sender:
        pg.send([buf], peer, 0).wait()
        pg.recv([ack], peer, 0).wait()
    else:
        pg.recv([buf], peer, 0).wait()
        pg.send([ack], peer, 0).wait()
    sync(dev)
    return time.perf_counter() - t0


def report(a: argparse.Namespace, mine: list[dict], theirs: list[dict]) -> dict:
    rows = []
    for p, d in zip(mine, theirs):
        gb = p["bytes"] / 1e9
        rows.append({
            "tokens": p["tokens"], "pages": p["pages"], "bytes": p["bytes"],
            "link_ms": p["link_s"] * 1e3, "link_gbps": gb / p["link_s"],
            "plain_ms": p["plain_s"] * 1e3, "plain_gbps": gb / p["plain_s"],
            "link_over_plain": p["plain_s"] / p["link_s"], "bytes_equal": p["checksum"] == d["checksum"],
        })
    lay = layout_of(a)
    return {"device": a.device, "gpus": a.gpus if a.device == "cuda" else "", "model": MODEL,
            "layout": {"num_layers": lay.num_layers, "num_parts": 1, "entry_dim": lay.entry_dim,
                       "page_size": lay.page_size, "dtype": a.dtype, "page_bytes": lay.page_bytes()},
            "gpu_name": torch.cuda.get_device_name(0) if a.device == "cuda" else "", "reps": a.reps, "rows": rows}


def print_table(res: dict) -> None:
    print(f"KV link vs plain send/recv ({res['device']} {res['gpu_name']}, {res['model']}, "
          f"page {res['layout']['page_size']}, {res['layout']['dtype']}, median of {res['reps']})")
    print(f"{'tokens':>7} {'pages':>6} {'MB':>8} {'link ms':>8} {'link GB/s':>10} {'plain ms':>9} "
          f"{'plain GB/s':>11} {'link/plain':>10} {'bytes ok':>8}")
    for r in res["rows"]:
        print(f"{r['tokens']:>7} {r['pages']:>6} {r['bytes'] / 1e6:>8.1f} {r['link_ms']:>8.2f} "
              f"{r['link_gbps']:>10.1f} {r['plain_ms']:>9.2f} {r['plain_gbps']:>11.1f} "
              f"{r['link_over_plain']:>10.2f} {str(r['bytes_equal']):>8}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.role == "decode":
        print(json.dumps(run_side(a)), flush=True)
        return
    a.port = a.port or free_port()
    argv_child = [sys.executable, "-m", "bench.kv_transfer", *(argv if argv is not None else sys.argv[1:]),
                  "--role", "decode", "--port", str(a.port)]
    child = subprocess.Popen(argv_child, stdout=subprocess.PIPE, text=True, env={**os.environ})
    mine = run_side(a)
    out, _ = child.communicate(timeout=300)
    if child.returncode != 0:
        raise SystemExit(f"decode side failed (rc {child.returncode})")
    res = report(a, mine, json.loads(out.strip().splitlines()[-1]))
    print_table(res)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    if not all(r["bytes_equal"] for r in res["rows"]):
        raise SystemExit("bytes differ between the two ends")


if __name__ == "__main__":
    main()
