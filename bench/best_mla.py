"""The MLA decode config that bench/decode_sweep.py measured fastest at B 256 ctx 640 (a batch that fills the SMs:
kernels.mla_decode.WIDE_CONFIGS' case; rel err < 2e-2), printed as profile_step's --mla_wide_config
"BLOCK_N,warps,stages". Only variants with the rule's split count (splits 0: one at B 256) that
prefetch the page ids are candidates; nothing is printed (exit 1) when the rule itself was fastest.
    python -m bench.best_mla OUT/mla_sweep.json
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


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        out = best(json.load(f)["rows"])
    if out is None:
        raise SystemExit(1)
    print(out)
