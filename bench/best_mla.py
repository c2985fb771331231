"""The MLA decode config that bench/decode_sweep.py measured fastest at B 256 ctx 640 (a batch that fills the SMs:
kernels.mla_decode.WIDE_CONFIGS' case; rel err < 2e-2), printed as profile_step's --mla_wide_config
"BLOCK_N,warps,stages". Only variants with the rule's split count (splits 0: one at B 256) that
prefetch the page ids are candidates; nothing is printed (exit 1) when the rule itself was fastest.
    python -m bench.best_mla OUT/mla_sweep.json
With --wg: the Hopper warpgroup-MMA kernel's rule instead, as profile_step's --mla_wg (see best_wg).
    python -m bench.best_mla --wg OUT/mla_sweep.json
"""

from __future__ import annotations

import json
import re
import sys

SHAPE = (256, 640)  # (B, ctx)


def best(rows: list[dict]) -> str | None:
    ok = [r for r in rows if r.get("kernel") == "mla" and "error" not in r and (r["b"], r["ctx"]) == SHAPE
          and r["rel_err"] < 2e-2]
    if not ok:
        return None
    m = re.fullmatch(r"n(\d+) w(\d+) s(\d+) split0 prefetch1", min(ok, key=lambda r: r["us"])["variant"])
    if m is None:  # the rule itself won, or a fixed-split variant: nothing to A/B
        return None
    return ",".join(m.groups())


def best_wg(rows: list[dict]) -> str | None:
    """The warpgroup-MMA kernel as profile_step's --mla_wg "min_batch,warps,stages": the fastest rule-split wg
    variant at B 256, used from the smallest ctx-640 batch from which on it beats the rule at every measured batch; None if it never does."""
    ok = [r for r in rows if r.get("kernel") == "mla" and "error" not in r and r["rel_err"] < 2e-2]
    wide = [r for r in ok if (r["b"], r["ctx"]) == SHAPE and re.fullmatch(r"wg w\d+ s\d+ split0", r["variant"])]
    if not wide:
        return None
    variant = min(wide, key=lambda r: r["us"])["variant"]
    warps, stages = re.fullmatch(r"wg w(\d+) s(\d+) split0", variant).groups()
    us = {(r["b"], r["variant"]): r["us"] for r in ok if r["ctx"] == SHAPE[1]}
    min_b = None
    for b in sorted({b for b, v in us if v == variant}, reverse=True):  # the batches from which on it always wins
        if us[(b, variant)] >= us.get((b, "rule"), 0.0):
            break
        min_b = b
    return None if min_b is None else f"{min_b},{warps},{stages}"


if __name__ == "__main__":
    with open(sys.argv[-1]) as f:
        rows = json.load(f)["rows"]
    out = best_wg(rows) if "--wg" in sys.argv else best(rows)
    if out is None:
        raise SystemExit(1)
    print(out)
