"""MLA decode kernel (kernels/mla_decode.py): the split rule (up to cdiv(SMs, B) splits, each at least
min_keys keys) per batch size and context, for several min_keys, as a fraction of the HBM copy bandwidth
measured in the same run, timed in a CUDA graph (bytes = B * ctx * 576 * 2: the latent cache read once). Times include the
split merge. Small batches at short context are latency-bound (few programs), where min_keys decides
how many SMs work.
    python -m bench.mla_splits [--min_keys 128,64,32] [--shapes 1x640,4x640,...]
"""

from __future__ import annotations

import argparse

import torch

from bench.profile_step import copy_bandwidth, timed
from glmserve.kernels.mla_decode import MIN_KEYS, mla_decode

SHAPES = "1x640,4x640,16x640,64x640,256x640,1x4096,1x16384,16x4096"


def graph_timed(fn, reps: int = 20) -> float:
    """Seconds a call, from one CUDA graph of `reps` calls (no launch overhead: these kernels take a few us)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return timed(g.replay, 10) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min_keys", default=f"{MIN_KEYS},64,32")
    ap.add_argument("--shapes", default=SHAPES, help="comma list of BxCTX")
    a = ap.parse_args()
    bw = copy_bandwidth()
    keys = [int(k) for k in a.min_keys.split(",")]
    print(f"HBM copy {bw:.0f} GB/s (read + write); us (fraction of copy) per min_keys {keys}")
    for shape in a.shapes.split(","):
        b, ctx = (int(v) for v in shape.split("x"))
        pages = ctx // 16 + 1
        cache = torch.randn(b * pages * 16, 1, 576, device="cuda", dtype=torch.bfloat16)
        table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, 20, 576, device="cuda", dtype=torch.bfloat16)
        nbytes = b * ctx * 576 * 2
        ref = mla_decode(q, cache, table, lens, 16, 0.1, ctx, 512, min_keys=keys[0]).float()
        cells = []
        for k in keys:
            out = mla_decode(q, cache, table, lens, 16, 0.1, ctx, 512, min_keys=k).float()
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (shape, k, err)
            t = graph_timed(lambda: mla_decode(q, cache, table, lens, 16, 0.1, ctx, 512, min_keys=k))
            cells.append(f"{k:4d}: {t * 1e6:7.1f} us ({nbytes / t / 1e9 / bw:.2f})")
        print(f"B {b:4d} ctx {ctx:6d}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
