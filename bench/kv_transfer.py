"""KV-link throughput: the pages of 1k-, 4k- and 16k-token prompts, next to plain send/recv.

Two processes (this one = prefill on the first GPU, a child = decode on the second), one
KVLink between them built by the real rendezvous (signature check, warm-up). For each prompt
size, median of --reps after one warm-up rep:
- link: the decode sends a 4-byte "go" and posts recv_pages (in this order: the link's order is
        go, pages on both ends; NCCL runs one end's ops in post order, so recv-then-go would
        deadlock against the prefill's go-then-send); the prefill, once it has the go,
        stamps CLOCK_MONOTONIC and posts send_pages; the decode stamps when wait() says DONE
        (pages scattered into its cache). link ms = decode stamp - prefill stamp (one host, one
        clock): what a request waits, gather + wire + scatter + the link's own overhead.
- gather / scatter: the link's own kernels (xfer_buffer.gather_pages / scatter_pages) alone,
        CUDA events.
- plain gpu: the same bytes as one raw send/recv on the same process group, after a 4-byte ping
        that lines both ends up; CUDA events around the op (decode side): the wire ceiling.
- plain host: the raw send/recv timed like the link (go, stamps), for a like-for-like ratio.
- other = link - (gather + plain gpu + scatter): what the link adds beyond its kernels.
It also checks the bytes arrived (float64 sum of the pages on both ends).

GPU (the lead): `python -m bench.kv_transfer --device cuda --gpus 0,1 --out kv_transfer.json`
  (GLM-4.7-Flash layout: 47 layers + MTP = 48, MLA 576 entries, bf16, page 16; < 2 minutes).
CPU smoke (gloo): `python -m bench.kv_transfer --device cpu --tokens 64,256 --num_layers 4 --reps 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from glmserve.shared.kvcache.cache import KVLayout, PagedKVCache
from glmserve.shared.kvcache.link import LinkSignature, XferState
from glmserve.shared.kvcache.rendezvous import accept_link, connect_link, open_store
from glmserve.shared.kvcache.xfer_buffer import HEADER_BYTES, gather_pages, scatter_pages
from glmserve.shared.ports import free_port

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
    rows = []
    for tokens, n in sizes(a):
        t0 = time.monotonic()
        rows.append(measure(a, link, cache, tokens, n, dev))
        progress(a.role, rows[-1], time.monotonic() - t0)
    link.close()
    return rows


def measure(a, link, cache: PagedKVCache, tokens: int, n: int, dev: str) -> dict:
    """One prompt size on this side. Times are CLOCK_MONOTONIC (shared by both processes on one
    host): the prefill returns when it posted, the decode when the pages were in its cache."""
    sender = a.role == "prefill"
    ids = page_ids(cache.num_pages, n, seed=1 if sender else 2, device=dev)
    nbytes = n * cache.layout.page_bytes()
    stamps = [link_once(link, sender, cache, ids, f"t{tokens}/r{rep}") for rep in range(a.reps + 1)]
    checksum = float(cache.buffer.index_select(2, ids).double().sum())
    buf = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=dev)
    plain = [plain_once(link.pg, sender, buf, dev) for _ in range(a.reps + 1)]
    kernel_ms = [time_kernel(cache, ids, buf, sender, dev) for _ in range(a.reps + 1)]
    del buf
    return {"tokens": tokens, "pages": n, "bytes": nbytes, "checksum": checksum,
            "link_t": stamps[1:], "plain_t": [p[0] for p in plain[1:]],
            "plain_gpu_ms": statistics.median(p[1] for p in plain[1:]),
            "kernel_ms": statistics.median(kernel_ms[1:])}


def progress(role: str, row: dict, seconds: float) -> None:
    """One line per size as soon as this side measured it (stderr, flushed): a run cut off by a
    timeout still shows how far it got."""
    t = row["link_t"]
    span = f"post times {t[0]:.3f}..{t[-1]:.3f}" if role == "prefill" else f"done times {t[0]:.3f}..{t[-1]:.3f}"
    print(f"[{role}] {row['tokens']} tokens, {row['bytes'] / 1e6:.1f} MB: {len(t)} link reps ok ({span}), "
          f"plain gpu {row['plain_gpu_ms']:.2f} ms, kernel {row['kernel_ms']:.2f} ms, size took {seconds:.1f} s",
          file=sys.stderr, flush=True)


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def link_once(link, sender: bool, cache: PagedKVCache, ids: torch.Tensor, x: str) -> float:
    """The decode says "go" (4 bytes back), then posts its recv; the prefill stamps the time and
    posts send_pages. Prefill returns its post time, the decode its DONE time.

    Both ends post in the same order (go, then the pages), as the link contract requires: on
    NCCL each end's ops run in post order on one stream, so a decode posting recv(pages) before
    send(go) would wait forever for a send the prefill posts only after it got the go."""
    go = torch.zeros(1, dtype=torch.int32, device=ids.device)
    if sender:
        link.recv_tensor(x + "/go", go)
        assert link.wait(x + "/go", 120) is XferState.DONE, link.error
        t = now()
        link.send_pages(x, cache, ids)
    else:
        link.send_tensor(x + "/go", go)
        link.recv_pages(x, cache, ids)
    assert link.wait(x, 120) is XferState.DONE, link.error
    t = t if sender else now()
    assert link.wait(x + "/go", 120) is XferState.DONE, link.error
    link.forget(x), link.forget(x + "/go")
    return t


def plain_once(pg, sender: bool, buf: torch.Tensor, dev: str) -> tuple[float, float]:
    """The same bytes as one raw send/recv: (post time (prefill) / arrival time (decode), GPU ms).

    A 4-byte ping first lines the two GPU streams up (both pass it at the same moment); the GPU
    time is the CUDA-event time from there to the end of the big op, read on each side (the
    decode's is the transfer). The host times use the link's method (go message, then stamps)."""
    peer, ping = (1 if sender else 0), torch.zeros(1, dtype=torch.int32, device=buf.device)
    go = pg.recv([ping], peer, 0) if sender else pg.send([ping], peer, 0)
    go.wait()
    sync(dev)
    t0 = now()
    start, end = _events(dev)
    _record(start)
    work = pg.send([buf], peer, 0) if sender else pg.recv([buf], peer, 0)
    work.wait()
    _record(end)
    sync(dev)
    t1 = now()
    return (t0 if sender else t1), (start.elapsed_time(end) if start is not None else (t1 - t0) * 1e3)


def _events(dev: str):
    if not dev.startswith("cuda"):
        return None, None
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _record(event) -> None:
    if event is not None:
        event.record()


def time_kernel(cache: PagedKVCache, ids: torch.Tensor, buf: torch.Tensor, sender: bool, dev: str) -> float:
    """ms of the link's own gather (prefill) / scatter (decode) kernel for these pages."""
    start, end = _events(dev)
    sync(dev)
    t0 = now()
    _record(start)
    if sender:
        gather_pages(cache, ids, buf)
    else:
        scatter_pages(cache, ids, buf[HEADER_BYTES:])
    _record(end)
    sync(dev)
    return start.elapsed_time(end) if start is not None else (now() - t0) * 1e3


def report(a: argparse.Namespace, mine: list[dict], theirs: list[dict]) -> dict:
    rows = []
    for p, d in zip(mine, theirs):
        gb = p["bytes"] / 1e9
        link_ms = statistics.median(1e3 * (td - tp) for tp, td in zip(p["link_t"], d["link_t"]))
        plain_ms = statistics.median(1e3 * (td - tp) for tp, td in zip(p["plain_t"], d["plain_t"]))
        wire_ms = d["plain_gpu_ms"]
        rows.append({
            "tokens": p["tokens"], "pages": p["pages"], "bytes": p["bytes"],
            "link_ms": link_ms, "link_gbps": gb / (link_ms / 1e3),
            "gather_ms": p["kernel_ms"], "scatter_ms": d["kernel_ms"],
            "plain_gpu_ms": wire_ms, "plain_gpu_gbps": gb / (wire_ms / 1e3),
            "plain_host_ms": plain_ms, "plain_host_gbps": gb / (plain_ms / 1e3),
            "link_over_plain": wire_ms / link_ms, "link_over_plain_host": plain_ms / link_ms,
            "link_overhead_ms": link_ms - (p["kernel_ms"] + wire_ms + d["kernel_ms"]),
            "bytes_equal": p["checksum"] == d["checksum"],
        })
    lay = layout_of(a)
    return {"device": a.device, "gpus": a.gpus if a.device == "cuda" else "", "model": MODEL,
            "layout": {"num_layers": lay.num_layers, "num_parts": 1, "entry_dim": lay.entry_dim,
                       "page_size": lay.page_size, "dtype": a.dtype, "page_bytes": lay.page_bytes()},
            "gpu_name": torch.cuda.get_device_name(0) if a.device == "cuda" else "", "reps": a.reps, "rows": rows}


def print_table(res: dict) -> None:
    print(f"KV link vs plain send/recv ({res['device']} {res['gpu_name']}, {res['model']}, "
          f"page {res['layout']['page_size']}, {res['layout']['dtype']}, median of {res['reps']})")
    print("link = prefill posts send_pages -> pages in the decode's cache (host clock, both ends);"
          " gather/scatter = the link's own kernels (CUDA events); plain gpu = raw send/recv of the"
          " same bytes after a ping (CUDA events); plain host = raw send/recv timed like the link")
    print(f"{'tokens':>7} {'MB':>7} {'link ms':>8} {'GB/s':>6} {'gather':>7} {'plain gpu':>9} {'GB/s':>6} "
          f"{'scatter':>7} {'other':>6} {'plain host':>10} {'link/plain':>10} {'(host)':>6} {'ok':>5}")
    for r in res["rows"]:
        print(f"{r['tokens']:>7} {r['bytes'] / 1e6:>7.1f} {r['link_ms']:>8.2f} {r['link_gbps']:>6.0f} "
              f"{r['gather_ms']:>7.2f} {r['plain_gpu_ms']:>9.2f} {r['plain_gpu_gbps']:>6.0f} "
              f"{r['scatter_ms']:>7.2f} {r['link_overhead_ms']:>6.2f} {r['plain_host_ms']:>10.2f} "
              f"{r['link_over_plain']:>10.2f} {r['link_over_plain_host']:>6.2f} {str(r['bytes_equal']):>5}")


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
