"""Profile one DECODE step of a real-shape model with dummy weights (GPU; developer tool).

Prints, per batch size and tokens per sequence (1 = DECODE; K + 1 = an MTP VERIFY step), the eager step
time, the CUDA-graph replay time of the same step (the difference is launch and host overhead), whether
the eager step is free of host syncs (torch's sync debug mode), the HBM roofline of the step (bytes of the
active weights + KV read / copy bandwidth measured in the same run), and for the profiled DECODE shapes
torch.profiler's top ops by CUDA and by CPU time and the fraction of HBM bandwidth the step's big kernels
reach (MoE GEMM: touched experts' weights; MLA decode: the latent cache; dense FP8 GEMMs: their weights).
    python -m bench.profile_step --preset glm-4.7-flash --batch 16 --ctx 512 --out step.json
    python -m bench.profile_step --batches 1,16,64,128 --verify_tokens 1,2,4 --out steps.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch.autograd import DeviceType

from glmserve.shared.config.presets import write_preset
from glmserve.shared.kvcache.cache import PagedKVCache
from glmserve.shared.model import ops
from glmserve.shared.model.layers.moe import Router
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
from glmserve.shared.runner.model_runner import ModelRunner

PAGE = 16


def timed(fn, iters: int) -> float:
    """Median seconds of fn over iters runs, with CUDA events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB buffer."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / timed(lambda: y.copy_(x), 10) / 1e9


def step_bytes(runner: ModelRunner, touched: dict[int, int], kv_bytes: float
               ) -> tuple[float, list[tuple[str, tuple[str, ...], float]]]:
    """One pass over the parameters -> (weight bytes one step must read, kernel groups).

    Weights: every non-expert weight (less the embedding table, of which only the batch's rows are read)
    plus, per MoE layer, the expert slots the step reads: the experts its tokens were routed to (`touched`:
    layer -> distinct routed experts, measured on the same batch) and a fused shared expert (the stacked
    experts' slots past E, read by every token). Groups: (label, kernel-name substrings, HBM bytes one step
    must move through those kernels) for the kernels that dominate a decode step: the MoE GEMMs read those
    expert slots' weights (and scales), MLA decode the latent cache, the dense FP8 GEMMs every non-expert
    FP8 weight and scale."""
    e = runner.config.n_routed_experts
    total = moe = dense_fp8 = absorb = 0.0
    for name, p in runner.model.named_parameters():
        n = p.numel() * p.element_size()
        if ".experts." in name:  # stacked [S, ...]: slots 0..E-1 routed, E.. shared (always read)
            layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else -1
            slots = p.shape[0]
            moe += n / slots * (touched.get(layer, 0) + (slots - e if layer in touched else 0))
        else:
            total += n
            if ".kv_b_proj." in name:  # read at decode by the absorbed form's two GEMMs (kernels/mla_absorb.py)
                absorb += n
            elif p.dtype == torch.float8_e4m3fn or name.endswith("weight_scale"):
                dense_fp8 += n
    embed = runner.model.model.embed_tokens.weight
    weights = total - embed.numel() * embed.element_size() + moe
    groups = [("MoE GEMM (touched experts)", ("_moe_gemm",), moe), ("MLA decode (latent cache)", ("_mla_decode",), kv_bytes)]
    if dense_fp8:
        groups.append(("dense FP8 GEMMs (weights)", ("_fp8_gemm",), dense_fp8))
    if absorb:
        groups.append(("MLA absorb (kv_b_proj)", ("_mla_absorb",), absorb))
    return weights, groups


def hbm_by_kernel(averages, groups: list[tuple[str, tuple[str, ...], float]], bw_gbps: float) -> list[dict]:
    """Per group: CUDA ms summed over its kernels (torch.profiler key averages), the bytes it must move,
    and its fraction of the copy bandwidth; then every other device kernel as one row (no bytes). Host-side
    rows (aten:: ops, whose time is their kernels', and launch calls such as cuLaunchKernelEx) are left out."""
    rows, seen = [], set()
    for label, patterns, nbytes in groups:
        us, calls = 0.0, 0
        for evt in averages:
            if evt.key not in seen and any(s in evt.key for s in patterns):
                seen.add(evt.key)
                us += _device_us(evt)
                calls += evt.count
        ms = us / 1e3
        rows.append(dict(kernel=label, calls=calls, ms=ms, gb=nbytes / 1e9,
                         fraction_of_hbm=(nbytes / bw_gbps / 1e9) / (ms / 1e3) if ms else 0.0))
    rest = [e for e in averages if e.key not in seen and _device_us(e) > 0 and _on_device(e)]
    rows.append(dict(kernel="all other kernels", calls=sum(e.count for e in rest),
                     ms=sum(_device_us(e) for e in rest) / 1e3, gb=0.0, fraction_of_hbm=0.0))
    return rows


def _on_device(evt) -> bool:
    """A device kernel's row (not a host op or a runtime call, whose device_type is CPU)."""
    return getattr(evt, "device_type", None) not in (None, DeviceType.CPU)


def _device_us(evt) -> float:
    """Self device time of a key average, in us (torch renamed the attribute from cuda to device)."""
    return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0) or 0.0)


def experts_touched_by(runner: ModelRunner, run) -> dict[int, int]:
    """{MoE layer: distinct experts} the eager forwards of run() route to (DESIGN §7: print it for dummy weights)."""
    runner.track_expert_usage()
    try:
        run()
        touched = {i: int((c > 0).sum()) for i, c in runner.expert_usage().items() if c.sum() > 0}
    finally:
        runner.track_expert_usage(False)
    if not touched and runner.moe_layer_indices():  # graphs captured before tracking do not count
        raise RuntimeError("no expert counted: the forward replayed a CUDA graph; clear runner.graph_sets first")
    return touched


def experts_touched(runner: ModelRunner, dec: ForwardBatch, kv: PagedKVCache) -> dict[int, int]:
    """{MoE layer: distinct experts} for one eager forward of this batch."""
    return experts_touched_by(runner, lambda: runner.forward(dec, kv))


def touched_summary(touched: dict[int, int]) -> str:
    """'mean (min m)' experts a MoE layer, the benchmarks' printed column."""
    return f"{sum(touched.values()) / max(1, len(touched)):.1f} (min {min(touched.values(), default=0)})"


def step_batch(runner: ModelRunner, batch: int, ctx: int, q: int) -> tuple[ForwardBatch, PagedKVCache]:
    """batch sequences of ctx cached tokens feeding q tokens each (q = 1: DECODE, q > 1: VERIFY, MTP K = q - 1)."""
    per_seq = -(-(ctx + q) // PAGE)
    kv = PagedKVCache(runner.kv_layout(PAGE), 1 + batch * per_seq, "cuda")  # page 0: the graphs' dummy page
    g = torch.Generator().manual_seed(batch * 1000 + q)  # distinct random tokens: realistic routing spread
    ids = torch.randint(3, runner.config.vocab_size, (batch, q), generator=g).tolist()
    seqs = [(ids[i], ctx, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))) for i in range(batch)]
    mode, rows = (ForwardMode.DECODE, "last") if q == 1 else (ForwardMode.VERIFY, "all")
    return ForwardBatch.build(mode, seqs, PAGE, logits_rows=rows, device="cuda"), kv


def sync_free(runner: ModelRunner, dec: ForwardBatch, kv: PagedKVCache) -> str:
    """'yes' when the eager step runs under torch's sync debug mode 'error' (no .item()/.tolist()/D2H inside)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.forward(dec, kv)
        return "yes"
    except RuntimeError as e:
        return f"no: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def print_profile(runner: ModelRunner, dec: ForwardBatch, kv: PagedKVCache, groups, bw: float) -> list[dict]:
    """torch.profiler's top ops by CUDA and by CPU time for one eager step, then the HBM fraction of the
    kernels that move the step's bytes (`step_bytes`); returns those rows."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    with prof:
        runner.forward(dec, kv)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=18))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18))
    rows = hbm_by_kernel(ka, groups, bw)
    print(f"{'kernel':32s} {'calls':>6s} {'ms':>8s} {'GB':>8s} {'of HBM':>7s}")
    for r in rows:
        print(f"{r['kernel']:32s} {r['calls']:6d} {r['ms']:8.3f} {r['gb']:8.3f} {r['fraction_of_hbm']:7.2f}")
    return rows


def measure(runner: ModelRunner, batch: int, ctx: int, q: int, bw: float, profile: bool) -> dict:
    """Eager vs graph time of one step at this shape, and its HBM floor (weights + KV read at bw GB/s)."""
    runner.graph_sets.clear()
    dec, kv = step_batch(runner, batch, ctx, q)
    eager = timed(lambda: runner.forward(dec, kv), 10)
    no_sync = sync_free(runner, dec, kv)
    touched = experts_touched(runner, dec, kv)
    kv_bytes = kv.layout.page_bytes() / PAGE * ctx * batch
    wbytes, groups = step_bytes(runner, touched, kv_bytes)
    kernels = print_profile(runner, dec, kv, groups, bw) if profile else []
    t0 = time.perf_counter()
    runner.capture_decode_graphs(kv, max_batch_size=batch, max_seq_len=ctx + q, tokens_per_seq=q)
    capture_s = time.perf_counter() - t0
    runs = runner.graph_runs()
    graph = timed(lambda: runner.forward(dec, kv), 20)
    assert runner.graph_runs() > runs, "the step did not take the graph path"
    floor = (wbytes + kv_bytes) / (bw * 1e9)
    del kv, dec
    return dict(batch=batch, tokens_per_seq=q, eager_ms=eager * 1e3, graph_ms=graph * 1e3, capture_s=capture_s,
                sync_free=no_sync, experts_touched_mean=sum(touched.values()) / max(1, len(touched)),
                experts_touched_min=min(touched.values(), default=0), weight_bytes=wbytes, kv_bytes=kv_bytes, roofline_ms=floor * 1e3,
                graph_fraction_of_roofline=floor / graph, tok_s_graph=batch / graph, kernels_hbm=kernels)


def _unfused_mla_kv_write(ckv, weight, eps, cos, sin, cache, slots, q_pe, q_out, rotary_dim, interleaved):
    """A/B: ops.mla_kv_write as it ran before its fused kernel: RMSNorm, k RoPE, index_copy_, q RoPE kernels."""
    lora = weight.shape[0]
    kv_new = torch.empty(ckv.shape, dtype=ckv.dtype, device=ckv.device)
    ops.rms_norm(ckv[:, :lora], weight, eps, kv_new[:, :lora])
    ops.rope(ckv[:, None, lora:], cos, sin, rotary_dim, interleaved, kv_new[:, None, lora:])
    cache.index_copy_(0, slots, kv_new[:, None].to(cache.dtype))
    ops.rope(q_pe, cos, sin, rotary_dim, interleaved, q_out)


def _bmm_absorb():
    """A/B: ops.mla_absorb as it ran before its kernel: torch.bmm on a bf16 copy of W_UK / W_UV dequantized at
    the first call (load time, as MLAAttention.after_load did), cached by the weight view's address."""
    cache: dict[tuple, torch.Tensor] = {}

    def absorb(a, w, w_scale, k_rows, out):
        key = (w.data_ptr(), tuple(w.shape))
        if key not in cache:
            wd = w if w_scale is None else w.float() * w_scale.float()[..., None]
            cache[key] = wd.to(a.dtype).contiguous()
        return ops.mla_absorb_ref(a, cache[key], None, k_rows, out)  # the bmm on the copy

    return absorb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="glm-4.7-flash")
    ap.add_argument("--batch", type=int, default=16, help="one batch size (ignored when --batches is given)")
    ap.add_argument("--batches", default="", help="comma list, e.g. 1,16,64,128")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--verify_tokens", default="1", help="comma list of tokens per sequence: 1 = DECODE, K+1 = VERIFY")
    ap.add_argument("--quantization", default=None, choices=[None, "fp8"], help="fp8: W8A8 block-scaled weights")
    ap.add_argument("--no_profile", action="store_true", help="skip the torch.profiler tables")
    ap.add_argument("--profile_batches", default="", help="comma list of batches to profile (default: the first)")
    ap.add_argument("--disable_shared_experts_fusion", action="store_true",
                    help="the shared expert as its own MLP (A/B against the default fused slot)")
    ap.add_argument("--router_gemm", default="bf16", choices=["fused", "bf16", "fp32"],
                    help="fused: the logits in the routing kernel (kernels.moe_route.FUSED_GEMM); bf16: a cuBLAS "
                         "bf16-in fp32-out GEMM, then the routing kernel; fp32: the gate kept fp32, an fp32 GEMM of "
                         "x.float() (A/B)")
    ap.add_argument("--absorb", default="kernel", choices=["kernel", "bmm"],
                    help="bmm: MLA's absorbed up-projections as torch.bmm on a dequantized bf16 copy made once "
                         "(as before kernels/mla_absorb.py; A/B)")
    ap.add_argument("--mla_min_keys", type=int, default=None,
                    help="MLA decode: keys a split holds at least (kernels.mla_decode.MIN_KEYS; A/B)")
    ap.add_argument("--mla_wide_config", default="",
                    help="MLA decode config of batches that fill the SMs, BLOCK_N,warps,stages (e.g. 16,4,3; A/B "
                         "against kernels.mla_decode.WIDE_CONFIGS)")
    ap.add_argument("--mla_wg", default="",
                    help="MLA decode on the Hopper warpgroup-MMA kernel from this batch on: min_batch,warps,stages "
                         "(A/B against kernels.mla_decode.WG_CONFIGS; 'off' = never)")
    ap.add_argument("--unfused_mla_write", action="store_true",
                    help="MLA's cache write + q RoPE as the four launches before kernels/mla_kv_write.py (A/B)")
    ap.add_argument("--scaled_mm", default="",
                    help="per-channel FP8 GEMMs with lo <= M <= hi on torch._scaled_mm: lo,hi (A/B against "
                         "kernels.fp8_gemm.SCALED_MM_M; 'off' = never; its kernels count under \"all other kernels\")")
    ap.add_argument("--tma_mid", default="", choices=["", "on", "off"],
                    help="on: decode-batch FP8 GEMMs (64 < M <= 512) with K >= 2048 on the TMA kernel at 64x64x256; "
                         "off: on the pointer kernel (kernels.fp8_gemm.TMA_MID_M; default: the module's; A/B)")
    ap.add_argument("--splitk", default="", choices=["", "inline", "kernel"],
                    help="inline: split-K FP8 GEMMs finish their tiles in the GEMM kernel; kernel: in "
                         "_splitk_reduce_kernel (kernels.fp8_gemm.SPLITK_INLINE; default: the module's; A/B)")
    ap.add_argument("--absorb_large", default="on", choices=["on", "off"],
                    help="on: absorb launches of > LARGE_T tokens at kernels.mla_absorb.LARGE_CONFIGS; off: CONFIGS "
                         "at every size (A/B)")
    ap.add_argument("--moe_grid", default="used", choices=["used", "all"],
                    help="used: MoE GEMM grids cover the expert blocks that can hold pairs; all: every block of "
                         "moe_align's bound (kernels.fused_moe.BOUND_GRID; A/B)")
    ap.add_argument("--route_align", default="on", choices=["on", "off"],
                    help="on: batches of <= MAX_T tokens route and align their MoE pairs in one launch "
                         "(kernels.moe_route_align.ENABLED); off: router GEMM, routing kernel, moe_align (A/B)")
    ap.add_argument("--mla_prep", default="", choices=["", "on", "off"],
                    help="on: q_a's norm and the MLA cache write in one launch, the query RoPE in the W_UK launch; "
                         "off: rms_norm + mla_kv_write (shared.model.layers.mla.PREP_FUSED; default: the module's; "
                         "A/B)")
    ap.add_argument("--separate_slot_sum", action="store_true",
                    help="TP 1 MoE layers sum their slots in their own kernel, not in the next norm (A/B)")
    ap.add_argument("--pdl", default="on", choices=["on", "off"],
                    help="programmatic dependent launch of the Triton kernels (kernels._common.PDL_ENABLED; A/B)")
    ap.add_argument("--switches_on", default="",
                    help="comma list of bench.ab_step SWITCHES set on (e.g. the winners of an A/B: ab_step.winners)")
    ap.add_argument("--switches_off", default="",
                    help="comma list of bench.ab_step SWITCHES set off (e.g. an earlier run's defaults, as a baseline)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.switches_on or a.switches_off:
        from bench.ab_step import set_switch

        for names, on in ((a.switches_on, True), (a.switches_off, False)):
            for name in filter(None, names.split(",")):
                set_switch(name, on)
    if a.pdl == "off":
        from glmserve.kernels import _common

        _common.PDL_ENABLED = False
    from glmserve.kernels import fp8_gemm, fused_moe, moe_route, moe_route_align

    moe_route_align.ENABLED = a.route_align == "on"
    if a.scaled_mm:
        fp8_gemm.SCALED_MM_M = None if a.scaled_mm == "off" else tuple(int(v) for v in a.scaled_mm.split(","))
    fused_moe.BOUND_GRID = a.moe_grid == "used"
    if a.absorb_large == "off":
        from glmserve.kernels import mla_absorb

        mla_absorb.LARGE_T = 1 << 30
    if a.splitk:
        fp8_gemm.SPLITK_INLINE = a.splitk == "inline"
    if a.tma_mid:
        fp8_gemm.TMA_MID_M = fp8_gemm.TMA_MID_ON if a.tma_mid == "on" else None
    from glmserve.shared.model.layers import mla

    if a.mla_prep:
        mla.PREP_FUSED = a.mla_prep == "on"
    if a.separate_slot_sum:
        from glmserve.shared.model.layers import moe

        moe.SLOT_SUM_IN_NORM = False
    if a.unfused_mla_write:
        ops.set_impl("mla_kv_write", _unfused_mla_kv_write)
    moe_route.FUSED_GEMM = a.router_gemm == "fused"
    if a.absorb == "bmm":
        ops.set_impl("mla_absorb", _bmm_absorb())
    if a.mla_min_keys is not None:
        from glmserve.kernels import mla_decode

        mla_decode.MIN_KEYS = a.mla_min_keys
    if a.mla_wide_config:
        from glmserve.kernels import mla_decode

        cfg = tuple(int(v) for v in a.mla_wide_config.split(","))
        for k in mla_decode.WIDE_CONFIGS:  # every GPU's entry: the run's GPU is unknown
            mla_decode.WIDE_CONFIGS[k] = cfg
    if a.mla_wg:
        from glmserve.kernels import mla_decode
        from glmserve.kernels._common import gpu_name

        mla_decode.WG_CONFIGS.clear()  # 'off': the Triton kernel at every batch
        if a.mla_wg != "off":
            mla_decode.WG_CONFIGS[gpu_name(torch.device("cuda"))] = tuple(int(v) for v in a.mla_wg.split(","))
    d = tempfile.mkdtemp()
    runner = ModelRunner(write_preset(d, a.preset), device="cuda", dtype="bfloat16", load_format="dummy", with_mtp=False,
                         quantization=a.quantization, fuse_shared_experts=not a.disable_shared_experts_fusion)
    if a.router_gemm == "fp32":
        for m in runner.model.modules():
            if isinstance(m, Router):
                m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=False)
    bw = copy_bandwidth()
    batches = [int(b) for b in a.batches.split(",")] if a.batches else [a.batch]
    profiled = {int(b) for b in a.profile_batches.split(",")} if a.profile_batches else set(batches[:1])
    rows = []
    for q in (int(x) for x in a.verify_tokens.split(",")):
        for b in batches:
            profile = b in profiled and q == 1 and not a.no_profile
            if profile:
                print(f"--- torch.profiler, batch {b}")
            rows.append(measure(runner, b, a.ctx, q, bw, profile=profile))
            torch.cuda.empty_cache()
    fused = "off" if a.disable_shared_experts_fusion else "on"
    print(f"copy GB/s {bw:.0f}  preset {a.preset}  ctx {a.ctx}  weights {a.quantization or 'bf16'}  shared fusion {fused}"
          f"  router GEMM {a.router_gemm}  MLA min keys {a.mla_min_keys or 'default'}"
          f"  MLA cache write {'unfused' if a.unfused_mla_write else 'fused'}  MLA wide config {a.mla_wide_config or 'default'}"
          f"  MLA wgmma {a.mla_wg or 'default'}  scaled_mm {a.scaled_mm or 'default'}"
          f"  slot sum {'separate' if a.separate_slot_sum else 'in norm'}  PDL {a.pdl}  absorb {a.absorb}"
          f"  TMA mid {fp8_gemm.TMA_MID_M}"
          f"  split-K {'inline' if fp8_gemm.SPLITK_INLINE else 'kernel'}  MoE grid {a.moe_grid}"
          f"  absorb large {a.absorb_large}  route+align {a.route_align}  MLA prep {'on' if mla.PREP_FUSED else 'off'}")
    print("   B  q  experts/layer  eager ms  graph ms  roofline ms  roofline/graph  sync-free")
    for r in rows:
        print(f"{r['batch']:4d} {r['tokens_per_seq']:2d} {r['experts_touched_mean']:8.1f} (min {r['experts_touched_min']:2d})"
              f" {r['eager_ms']:9.2f} {r['graph_ms']:9.2f} {r['roofline_ms']:12.2f}"
              f" {r['graph_fraction_of_roofline']:15.2f}  {r['sync_free']}")
    res = dict(preset=a.preset, ctx=a.ctx, quantization=a.quantization or "bf16", shared_fusion=fused,
               router_gemm=a.router_gemm, copy_gbps=bw,
               rows=rows)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
