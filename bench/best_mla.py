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

SERVING = {(256, 640)}


def best(rows: list[dict]) -> str | None:
    total: dict[str, float] = {}
    seen: dict[str, int] = {}
    for r in rows:
        if r.get("kernel") != "mla" or "error" in r or (r["b"], r["ctx"]) not in SERVING or r["rel_err"] >= 2e-2:
            continue
        total[r["variant"]] = total.get(r["variant"], 0.0) + r["us"]
        seen[r["variant"]] = seen.get(r["variant"], 0) + 1
    full = {v: t for v, t in total.items() if seen[v] == len(SERVING)}
    if not full:
        return None
    name = min(full, key=full.get)
    m = re.fullmatch(r"n(\d+) w(\d+) s(\d+) split0 prefetch1", name)
    if m is None:  # the rule itself won, or a fixed-split variant: nothing to A/B
        return None
    return ",".join(m.groups())


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        out = best(json.load(f)["rows"])
    if out is None:
        raise SystemExit(1)
    print(out)
