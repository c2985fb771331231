"""Same-GPU KV link (cuda_ipc) throughput next to a device-to-device copy of the same bytes.

Two processes on ONE GPU (this one = prefill, a child = decode), one IPCLink between them built by
the real rendezvous (`--kv_transport cuda_ipc`: the decode maps the prefill's cache and copies the
pages itself). For each prompt size (GLM-4.7-Flash layout), median of --reps after a warm-up rep:
Each size twice: pages in one contiguous run on both ends, and scattered (a random order on both
ends, as in a pool that has turned over: the link's general Triton copy instead of strided copies).
- link: the decode posts recv_pages, then sets a "go" key in the link's store; the prefill stamps
        CLOCK_MONOTONIC and posts send_pages; the decode stamps when wait() says DONE (pages in its
        cache). link ms = decode stamp - prefill stamp (one host, one clock): what a request waits.
- copy kernel: the link's own copy (kernels/kv_pages.copy_between, prefill pages -> decode pages),
        CUDA events, in the decode process on the mapped cache.
- device copy: `dst.copy_(src)` of the same number of bytes, contiguous, CUDA events: the ceiling.
GB/s = payload bytes / time; the ratio is link GB/s / device-copy GB/s. The bytes are checked
(float64 sum of the pages on both ends).

GPU: `python -m bench.kv_ipc --out kv_ipc.json` (gpu_suite.sh onegpu). CPU smoke (shared memory):
`python -m bench.kv_ipc --device cpu --tokens 64,256 --num_layers 4 --reps 2`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import torch

from glmserve.shared.kvcache.cache import KVLayout, PagedKVCache
from glmserve.shared.kvcache.link import LinkSignature, XferState
from glmserve.shared.kvcache.rendezvous import accept_link, connect_link, open_store
from glmserve.shared.ports import free_port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kv_ipc", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--num_layers", "--num-layers", type=int, default=48)
    p.add_argument("--entry_dim", "--entry-dim", type=int, default=576)
    p.add_argument("--page_size", "--page-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--role", default="prefill", choices=["prefill", "decode"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _dev(a) -> str:
    return f"cuda:{a.gpu}" if a.device == "cuda" else "cpu"


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)


def _events_ms(fn, dev: str, reps: int, inner: int = 10) -> float:
    """Median ms of fn() (CUDA events around `inner` back-to-back calls, so the GPU time is not the host's
    launch time of one call; wall clock on CPU)."""
    out = []
    for _ in range(reps + 1):
        if dev.startswith("cuda"):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(inner):
                fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out[1:])


def run(a) -> list[dict]:
    dev = _dev(a)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    layout = KVLayout(a.num_layers, 1, a.page_size, 1, a.entry_dim, dtype)
    tokens = [int(t) for t in a.tokens.split(",")]
    num_pages = 2 * max(tokens) // a.page_size + 8
    sender = a.role == "prefill"
    cache = PagedKVCache(layout, num_pages, dev, shareable=sender)
    if sender:
        cache.buffer.normal_()
    store = open_store("127.0.0.1", a.port, is_host=sender)
    sig = LinkSignature.for_cache("bench", layout, 1)
    fn = connect_link if sender else accept_link
    link = fn(store, "p0", "d0", 0, sig, dev, 60.0, 60.0, "cuda_ipc", cache)
    rows = []
    for mode, tokens_n in [(m, t) for m in ("contiguous", "scattered") for t in tokens]:
        n = tokens_n // a.page_size
        src_ids = list(range(1, n + 1))
        dst_ids = list(range(num_pages - n, num_pages))
        if mode == "scattered":  # pages of a long-running pool: no two neighbours adjacent
            g = torch.Generator().manual_seed(n)
            src_ids = [src_ids[i] for i in torch.randperm(n, generator=g).tolist()]
            dst_ids = [dst_ids[i] for i in torch.randperm(n, generator=g).tolist()]
        times, stages = [], []
        for rep in range(a.reps + 1):
            x = f"{mode}{tokens_n}/{rep}"
            if sender:
                store.wait([x + "/go"])
                t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
                link.send_pages(x, cache, src_ids)
                assert link.wait(x, 60) is XferState.DONE, link.error
                store.set(x + "/t0", json.dumps([t0, link.last_marks.get("published", t0)]))
            else:
                link.recv_pages(x, cache, dst_ids)
                store.set(x + "/go", "1")
                assert link.wait(x, 60) is XferState.DONE, link.error
                t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
                store.wait([x + "/t0"])
                t0, published = json.loads(store.get(x + "/t0").decode())
                times.append(1e3 * (t1 - t0))
                m = link.last_marks  # where the time goes, ms after the prefill's post
                stages.append({k: 1e3 * (v - t0) for k, v in [("published", published), *m.items(), ("returned", t1)]})
        nbytes = n * layout.page_bytes()
        if sender:
            store.set(f"{mode}{tokens_n}/sum", repr(cache.buffer[:, :, 1:n + 1].double().sum().item()))
            continue
        store.wait([f"{mode}{tokens_n}/sum"])
        got = cache.buffer[:, :, num_pages - n:].double().sum().item()
        ok = abs(got - float(store.get(f"{mode}{tokens_n}/sum"))) < 1e-3 * max(1.0, abs(got))
        from glmserve.kernels.kv_pages import copy_between, copy_between_ref

        s_ids = torch.tensor(src_ids, device=dev)
        d_ids = torch.tensor(dst_ids, device=dev)
        peer = link.peer_cache
        kern = copy_between if dev.startswith("cuda") else copy_between_ref
        copy_ms = _events_ms(lambda: kern(peer, s_ids, cache.buffer, d_ids), dev, a.reps)
        flat_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        flat_dst = torch.empty_like(flat_src)
        dcopy_ms = _events_ms(lambda: flat_dst.copy_(flat_src), dev, a.reps)
        link_ms = statistics.median(times[1:])
        row = {"mode": mode, "tokens": tokens_n, "pages": n, "mb": nbytes / 1e6, "link_ms": link_ms,
               "link_gbps": nbytes / link_ms / 1e6, "copy_kernel_ms": copy_ms, "copy_kernel_gbps": nbytes / copy_ms / 1e6,
               "device_copy_ms": dcopy_ms, "device_copy_gbps": nbytes / dcopy_ms / 1e6, "bytes_ok": ok}
        row["link_vs_copy"] = row["link_gbps"] / row["device_copy_gbps"]
        keys = [k for k in stages[-1] if k != "posted"]
        row["stages_ms_after_post"] = {k: statistics.median(st[k] for st in stages[1:] if k in st) for k in keys}
        row["kernel_vs_copy"] = row["copy_kernel_gbps"] / row["device_copy_gbps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if sender:
        store.wait(["bye"], datetime.timedelta(seconds=300))  # the decode measures on our cache
    else:
        store.set("bye", "1")
    link.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.role == "decode":
        run(a)
        return
    a.port = a.port or free_port()
    child = subprocess.Popen([sys.executable, "-m", "bench.kv_ipc", *(argv if argv is not None else sys.argv[1:]),
                              "--role", "decode", "--port", str(a.port)], stdout=subprocess.PIPE, text=True)
    run(a)
    out, _ = child.communicate(timeout=300)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"{'pages':>10} {'tokens':>7} {'MB':>7} {'link ms':>8} {'link GB/s':>10} {'kernel GB/s':>12} {'copy GB/s':>10} "
          f"{'link/copy':>10} {'kernel/copy':>12} ok")
    for r in rows:
        print(f"{r['mode']:>10} {r['tokens']:>7} {r['mb']:>7.1f} {r['link_ms']:>8.3f} {r['link_gbps']:>10.0f} {r['copy_kernel_gbps']:>12.0f} "
              f"{r['device_copy_gbps']:>10.0f} {r['link_vs_copy']:>10.2f} {r['kernel_vs_copy']:>12.2f} {r['bytes_ok']}")
    for r in rows:
        print(f"{r['mode']:>10} {r['tokens']:>7} stages (ms after the prefill's post): " +
              "  ".join(f"{k} {v:.3f}" for k, v in r["stages_ms_after_post"].items()))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(a.gpu) if a.device == "cuda" else "cpu", "rows": rows}, f,
                      indent=1)
    if child.returncode or not rows or not all(r["bytes_ok"] for r in rows):
        sys.exit(f"kv_ipc: decode side failed (rc {child.returncode})")


if __name__ == "__main__":
    main()
