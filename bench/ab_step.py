"""In-process A/B of one kernel switch on the decode step's CUDA graph (GPU; developer tool).

profile_step runs one process per setting, and the same setting measured in two processes moved by up to
7 % at batch 1 (H100 run 30: 4.04-4.33 ms), as much as the levers being compared. Here one process builds the
model once, and per batch and round captures the step's graph with the switch on, then off (the order flipped
every round, so drift lands on both), timing the median of REPLAYS replays each. Prints every sample, then per
batch the median of each side, their difference and both as a fraction of the step's HBM roofline (weights the
step reads + KV, over the copy bandwidth measured in the same run), and how far the switch moved the step's
logits (a scheduling switch such as PDL must leave them bit-equal). Several switches (a comma list) are A/B'd
one after another on the one model; --also sets switches on for both sides.
    python -m bench.ab_step --switch route_align --batches 1,4,16 --rounds 4 --ctx 640 --quantization fp8
    python -m bench.ab_step --switch mla_q_async,route_align --also pdl_late --batches 1,256 --quantization fp8
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile

import torch

from bench.profile_step import PAGE, copy_bandwidth, experts_touched, step_batch, step_bytes, timed, touched_summary
from glmserve.shared.config.presets import write_preset
from glmserve.shared.runner.model_runner import ModelRunner

REPLAYS = 50
# switch -> (module, attribute, value "on", value "off")
SWITCHES: dict[str, tuple[str, str, object, object]] = {
    "route_align": ("glmserve.kernels.moe_route_align", "ENABLED", True, False),
    "route_relaxed": ("glmserve.kernels.moe_route_align", "RELAXED_RESET", True, False),
    "splitk_inline": ("glmserve.kernels.fp8_gemm", "SPLITK_INLINE", True, False),
    "moe_grid": ("glmserve.kernels.fused_moe", "BOUND_GRID", True, False),
    "moe_early": ("glmserve.kernels.fused_moe", "EARLY_LOADS", True, False),
    "gemm_early": ("glmserve.kernels.fp8_gemm", "EARLY_SCALES", True, False),
    "pdl": ("glmserve.kernels._common", "PDL_ENABLED", True, False),
    "pdl_late": ("glmserve.kernels._common", "PDL_LATE", True, False),
    "mla_prep": ("glmserve.shared.model.layers.mla", "PREP_FUSED", True, False),
    "mla_q_async": ("glmserve.kernels.mla_decode_wg", "Q_ASYNC", True, False),
    "mla_early_pages": ("glmserve.kernels.mla_decode_wg", "EARLY_PAGES", True, False),
    "lm_fp32": ("glmserve.shared.model.layers.embedding", "FP32_LOGITS", True, False),
    "gemv": ("glmserve.kernels.fp8_gemm", "GEMV_MAX_M", 4, 0),
    "moe_gemv": ("glmserve.kernels.fused_moe", "GEMV_MAX_T", 4, 0),
    "gemv_act": ("glmserve.kernels.fp8_gemv", "FUSED_ACT", True, False),  # acts only with gemv / moe_gemv on (--also)
    "mla_kv_in_absorb": ("glmserve.shared.model.layers.mla", "KV_WRITE_IN_ABSORB_MAX_T", 1 << 20, 0),
    "mla_two_per_sm": ("glmserve.kernels.mla_decode", "WG_TWO_PER_SM", True, False),
    "mla_wg8": ("glmserve.kernels.mla_decode", "WG_CONFIGS", {"default": (1, 8, 2)}, {"default": (1, 4, 2)}),
    "route_norm": ("glmserve.kernels.moe_route_align", "NORM_MAX_T", 4, 0),
    "moe_next_norm": ("glmserve.kernels.fused_moe", "NEXT_NORM_MAX_T", 4, 0),  # acts where the MoE GEMV does (T 1)
}
# Switches that change fp32 summation order everywhere they act (a different kernel for the same product). With the
# dummy checkpoint's random router, a last-bit change can flip a top-k choice in a later layer and move a row's
# logits far more than the sums did, so their logits difference is reported but does not decide (their GPU kernel
# tests bound the product itself; argmax agreement is printed beside it).
SUM_ORDER = {"gemv", "moe_gemv", "gemv_act", "route_norm", "moe_next_norm"}  # gemv_act: 8-byte weight pieces
# (16-bit A); route_norm, moe_next_norm: the norm's rstd reduced in another shape


def set_switch(name: str, on: bool) -> None:
    module, attr, on_value, off_value = SWITCHES[name]
    setattr(importlib.import_module(module), attr, on_value if on else off_value)


def winners(rows: list[dict], noise_ms: float = 0.02) -> list[str]:
    """Switches of an A/B (ab_rows' rows) worth turning on: faster in total over the batches measured, slower at
    none by more than noise_ms (the same-setting spread of one process, H100 run 31), and the step's logits
    moved by no more than summation order (1e-2 of max |logit|: bf16 rounding of a reordered sum; not checked for
    SUM_ORDER switches)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["switch"], []).append(r)
    return [name for name, rs in by.items()
            if sum(r["on_median"] - r["off_median"] for r in rs) < 0
            and all(r["on_median"] - r["off_median"] <= noise_ms
                    and (r["logits_rel_diff"] <= 1e-2 or name in SUM_ORDER) for r in rs)]


def graph_ms(runner: ModelRunner, dec, kv, batch: int, ctx: int) -> tuple[float, torch.Tensor]:
    """Capture this batch's DECODE graph with the switches as set now -> (median replay time in ms, the step's
    logits [B, V] fp32). Every replay writes the same cache slots with the same values, so the logits of any
    replay are the step's."""
    runner.graph_sets.clear()
    torch.cuda.empty_cache()
    runner.capture_decode_graphs(kv, max_batch_size=batch, max_seq_len=ctx + 1)
    runs = runner.graph_runs()
    ms = timed(lambda: runner.forward(dec, kv), REPLAYS) * 1e3
    assert runner.graph_runs() > runs, "the step did not take the graph path"
    return ms, runner.forward(dec, kv).logits.float().clone()


def ab_rows(runner: ModelRunner, switch: str, batches: list[int], rounds: int, ctx: int, bw: float) -> list[dict]:
    """One switch's A/B at each batch: `rounds` rounds of on / off (order flipped each round) -> one row a batch.
    The switch is left as it was found (its default, or on by --also), so the next switch's A/B sees that."""
    module, attr = importlib.import_module(SWITCHES[switch][0]), SWITCHES[switch][1]
    before = getattr(module, attr)
    rows = []
    for b in batches:
        dec, kv = step_batch(runner, b, ctx, 1)
        kv_bytes = kv.layout.page_bytes() / PAGE * ctx * b
        runner.graph_sets.clear()  # the eager forward counts the experts this batch routes to
        touched = experts_touched(runner, dec, kv)
        wbytes, _ = step_bytes(runner, touched, kv_bytes)
        floor_ms = (wbytes + kv_bytes) / (bw * 1e9) * 1e3
        samples: dict[bool, list[float]] = {True: [], False: []}
        logits: dict[bool, torch.Tensor] = {}
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_switch(switch, on)
                ms, logits[on] = graph_ms(runner, dec, kv, b, ctx)
                samples[on].append(ms)
                print(f"B {b:4d} round {r} {switch} {'on ' if on else 'off'} {ms:8.3f} ms", flush=True)
        setattr(module, attr, before)
        on_ms, off_ms = statistics.median(samples[True]), statistics.median(samples[False])
        # the switch must not change the step's result beyond summation order: max |on - off| / max |off|
        diff = float((logits[True] - logits[False]).abs().max() / logits[False].abs().max())
        agree = float((logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean())
        rows.append(dict(switch=switch, batch=b, on_ms=samples[True], off_ms=samples[False], on_median=on_ms,
                         off_median=off_ms, roofline_ms=floor_ms, logits_rel_diff=diff, argmax_agree=agree,
                         experts_touched=touched_summary(touched)))
        del dec, kv
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", required=True, help="comma list of SWITCHES, A/B'd one after another: " +
                    ", ".join(sorted(SWITCHES)))
    ap.add_argument("--also", default="", help="comma list of SWITCHES set on for both sides of every A/B")
    ap.add_argument("--preset", default="glm-4.7-flash")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--quantization", default=None, choices=[None, "fp8"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    switches, also = a.switch.split(","), [n for n in a.also.split(",") if n]
    for name in switches + also:
        if name not in SWITCHES:
            ap.error(f"unknown switch {name!r}; choose from {', '.join(sorted(SWITCHES))}")
    runner = ModelRunner(write_preset(tempfile.mkdtemp(), a.preset), device="cuda", dtype="bfloat16",
                         load_format="dummy", with_mtp=False, quantization=a.quantization)
    bw = copy_bandwidth()
    for name in also:
        set_switch(name, True)
    batches = [int(v) for v in a.batches.split(",")]
    rows = [row for name in switches for row in ab_rows(runner, name, batches, a.rounds, a.ctx, bw)]
    print(f"copy GB/s {bw:.0f}  preset {a.preset}  ctx {a.ctx}  weights {a.quantization or 'bf16'}"
          f"  also on {','.join(also) or '-'}  rounds {a.rounds}  replays {REPLAYS}")
    print("switch          B  experts/layer  on ms (roofline/graph)  off ms (roofline/graph)  on - off ms"
          "  logits max|on-off|/max|off|  argmax same")
    for r in rows:
        print(f"{r['switch']:12s} {r['batch']:4d}  {r['experts_touched']:>13s}"
              f"  {r['on_median']:7.3f} ({r['roofline_ms'] / r['on_median']:.3f})"
              f"        {r['off_median']:7.3f} ({r['roofline_ms'] / r['off_median']:.3f})"
              f"         {r['on_median'] - r['off_median']:+7.3f}  {r['logits_rel_diff']:.2e}"
              f"                     {r['argmax_agree']:.3f}")
    print("winners (ab_step.winners):", ",".join(winners(rows)) or "-")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(switches=switches, also=also, preset=a.preset, ctx=a.ctx, copy_gbps=bw, rows=rows,
                           winners=winners(rows)), f, indent=1)


if __name__ == "__main__":
    main()
