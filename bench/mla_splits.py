"""MLA decode kernel (kernels/mla_decode.py) with the split rule before (4 fixed splits) and now (up to
cdiv(SMs, B) splits of >= MIN_KEYS keys), per batch size and context, as a fraction of the HBM copy
bandwidth measured in the same run (bytes = B * ctx * 576 * 2: the latent cache read once).
    python -m bench.mla_splits
"""

from __future__ import annotations

import torch

from bench.profile_step import copy_bandwidth, timed
from glmserve.kernels.mla_decode import mla_decode

SHAPES = [(1, 16384), (1, 4096), (4, 16384), (16, 512), (16, 4096), (64, 512), (64, 4096), (128, 2048)]


def main() -> None:
    bw = copy_bandwidth()
    print(f"HBM copy {bw:.0f} GB/s (read + write)")
    for b, ctx in SHAPES:
        pages = ctx // 16 + 1
        cache = torch.randn(b * pages * 16, 1, 576, device="cuda", dtype=torch.bfloat16)
        table = torch.arange(b * pages, device="cuda", dtype=torch.int32).view(b, pages)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(b, 20, 576, device="cuda", dtype=torch.bfloat16)
        nbytes = b * ctx * 576 * 2
        old = timed(lambda: mla_decode(q, cache, table, lens, 16, 0.1, ctx, 512, splits=4, min_keys=0), 20)
        new = timed(lambda: mla_decode(q, cache, table, lens, 16, 0.1, ctx, 512), 20)
        print(f"B {b:4d} ctx {ctx:6d}: 4 splits {old * 1e6:8.1f} us ({nbytes / old / 1e9 / bw:.2f} of copy)"
              f"   now {new * 1e6:8.1f} us ({nbytes / new / 1e9 / bw:.2f})", flush=True)


if __name__ == "__main__":
    main()
