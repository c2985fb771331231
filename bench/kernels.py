"""Kernel benchmark (run on the GPU by bench/gpu_kernels.sh; never in CI).

Measures, in the same run, the ceilings (HBM copy GB/s counting read + write, the bf16 matmul peak,
the FP8 torch._scaled_mm peak), then each kernel at GLM-4.5-Air / GLM-4.7-Flash shapes as achieved
GB/s or TFLOP/s and as a fraction of its ceiling, next to the issue's target. Prints a markdown table
and writes JSON to --out. Times are medians of triton.testing.do_bench (CUDA events, warm).
    python -m bench.kernels --out /tmp/kernels.json [--quick]
Shapes come from one frozen `Sizes` (REAL here; tests run every section at SMOKE sizes on the CPU
interpreter so the script cannot crash on the GPU for a reason a CPU could have shown).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace

import torch
import triton

from glmserve.kernels import act_quant, fp8_gemm, fused_moe, kv_pages, moe_route, paged_attention, rmsnorm, rope
from glmserve.shared.runner.batch import ForwardBatch, ForwardMode

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


@dataclass(frozen=True)
class Sizes:
    dev: str = "cuda"
    tokens: int = 16384  # elementwise rows
    hidden: int = 4096
    heads: tuple[int, int, int, int] = (96, 8, 128, 64)  # Air: q heads, kv heads, head_dim, rotary dim
    act_i: int = 1408  # Air moe_intermediate_size
    gemm_ms: tuple[int, ...] = (64, 2048, 4096)
    gemm_nk: tuple[tuple[int, int], ...] = ((12288, 4096), (4096, 12288), (1024, 4096), (21888, 4096), (5120, 768))
    block_mnk: tuple[int, int, int] = (2048, 4096, 4096)
    moe: tuple[int, int, int, int] = (64, 2048, 1536, 4)  # Flash experts: E, H, I, top-k
    moe_tokens: tuple[int, ...] = (256, 4096)  # decode, prefill
    router: tuple[int, int, int] = (4096, 128, 4096)  # T, E, H
    decode: tuple[int, int] = (64, 4096)  # batch, context
    mla: tuple[int, int, int] = (20, 512, 64)  # heads, latent, rope dims
    prefill: tuple[int, int] = (4, 2048)  # sequences, tokens each
    kv_pages: tuple[int, int, int] = (46, 1024, 256)  # layers, pages in cache, pages gathered


REAL = Sizes()
QUICK = replace(REAL, gemm_ms=(64, 2048), gemm_nk=REAL.gemm_nk[:3], moe_tokens=(256,))
SMOKE = Sizes(dev="cpu", tokens=5, hidden=64, heads=(6, 2, 32, 16), act_i=40, gemm_ms=(3, 17), gemm_nk=((48, 64),),
              block_mnk=(5, 130, 140), moe=(6, 32, 24, 2), moe_tokens=(4, 40), router=(5, 12, 32), decode=(2, 37),
              mla=(3, 32, 16), prefill=(2, 9), kv_pages=(2, 8, 3))


@dataclass
class Row:
    kernel: str
    shape: str
    ms: float
    achieved: float  # GB/s or TFLOP/s
    unit: str
    ceiling: str  # which measured ceiling the fraction is of
    fraction: float
    target: str


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median"))


def ceilings() -> dict[str, float]:
    n, dev = 1 << 28, "cuda"  # 512 MiB of bf16 per buffer, far over L2
    src, dst = torch.randn(n, device=dev, dtype=BF16), torch.empty(n, device=dev, dtype=BF16)
    hbm = 2 * src.numel() * 2 / bench_ms(lambda: dst.copy_(src)) / 1e6
    a, b = torch.randn(8192, 8192, device=dev, dtype=BF16), torch.randn(8192, 8192, device=dev, dtype=BF16)
    bf16 = 2 * 8192 ** 3 / bench_ms(lambda: a @ b) / 1e9
    a8, b8 = a.to(FP8), b.to(FP8).t()  # b column-major, as _scaled_mm wants
    one = torch.ones((), device=dev)
    fp8 = 2 * 8192 ** 3 / bench_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=BF16, use_fast_accum=True)) / 1e9
    return {"hbm_GBps": hbm, "bf16_TFLOPs": bf16, "fp8_TFLOPs": fp8}


def _mem(name, shape, fn, nbytes, ceil, target) -> Row:
    ms = bench_ms(fn)
    gbs = nbytes / ms / 1e6
    return Row(name, shape, ms, gbs, "GB/s", "hbm", gbs / ceil["hbm_GBps"], target)


def _flop(name, shape, fn, flops, ceil, key, target) -> Row:
    ms = bench_ms(fn)
    tf = flops / ms / 1e9
    return Row(name, shape, ms, tf, "TFLOP/s", key, tf / ceil[key], target)


def _randn(sz: Sizes, *shape, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, device=sz.dev).to(dtype)


def elementwise_rows(ceil, sz: Sizes) -> list[Row]:
    t, h = sz.tokens, sz.hidden
    hq, hk, d, rd = sz.heads
    x, r, w = _randn(sz, t, h), _randn(sz, t, h), _randn(sz, h)
    rows = [
        _mem("rms_norm", f"{t}x{h}", lambda: rmsnorm.rms_norm(x, w, 1e-5), 2 * t * h * 2, ceil, ">=0.8"),
        _mem("add_rms_norm", f"{t}x{h}", lambda: rmsnorm.add_rms_norm(x, r, w, 1e-5), 4 * t * h * 2, ceil, ">=0.8"),
    ]
    q, k = _randn(sz, t, hq, d), _randn(sz, t, hk, d)
    pos = torch.randint(0, 4096, (t,), device=sz.dev)
    cos, sin = rope.cos_sin_cache(rd, 4096, 1e6, sz.dev)
    rows.append(_mem("rope_inplace neox", f"q{t}x{hq}x{d} k{t}x{hk}x{d} rd{rd}", lambda: rope.rope_inplace(
        q, k, pos, cos, sin, rd, False), 2 * t * (hq + hk) * rd * 2, ceil, ">=0.8"))
    i = sz.act_i
    g = _randn(sz, t, 2 * i)
    rows.append(_mem("silu_and_mul_fp8", f"{t}x{2 * i}", lambda: act_quant.silu_and_mul_fp8(g),
                     t * 2 * i * 2 + t * i + 4 * t, ceil, ">=0.8"))
    rows.append(_mem("silu_and_mul", f"{t}x{2 * i}", lambda: act_quant.silu_and_mul(g), t * 3 * i * 2, ceil, ">=0.8"))
    rows.append(_mem("quant_fp8_per_token", f"{t}x{h}", lambda: act_quant.quant_fp8_per_token(x),
                     t * h * 3 + 4 * t, ceil, ">=0.8"))
    return rows


def _gemm_row(ceil, sz: Sizes, m: int, n: int, k: int) -> Row:
    a_q, a_s = act_quant.quant_fp8_per_token(_randn(sz, m, k))
    w_q, w_s = _randn(sz, n, k, dtype=FP8), torch.rand(n, 1, device=sz.dev) + 0.5
    row = _flop("fp8_gemm per-channel", f"M{m} N{n} K{k}", lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s),
                2 * m * n * k, ceil, "fp8_TFLOPs", "")
    if sz.dev == "cuda":
        ref_ms = bench_ms(lambda: torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16))
        ratio = f"{ref_ms / row.ms:.2f}x _scaled_mm speed"
        row.target = f">=0.8x _scaled_mm: {ratio}" if m >= 2048 else ratio
    return row


def gemm_rows(ceil, sz: Sizes) -> list[Row]:
    rows = [_gemm_row(ceil, sz, m, n, k) for m in sz.gemm_ms for n, k in sz.gemm_nk]
    m, n, k = sz.block_mnk
    a_q, a_s = act_quant.quant_fp8_group(_randn(sz, m, k), 128)
    w_q = _randn(sz, n, k, dtype=FP8)
    w_s = torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device=sz.dev) + 0.5
    rows.append(_flop("fp8_gemm block128", f"M{m} N{n} K{k}",
                      lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, block=128), 2 * m * n * k, ceil, "fp8_TFLOPs", ""))
    return rows


def moe_rows(ceil, sz: Sizes) -> list[Row]:
    """Flash experts; decode rows count the weight bytes of the experts the routing actually touched."""
    e, h, i, k = sz.moe
    w13, w2 = _randn(sz, e, 2 * i, h) * h ** -0.5, _randn(sz, e, h, i) * i ** -0.5
    s13, s2 = w13.float().abs().amax(-1, keepdim=True) / 448, w2.float().abs().amax(-1, keepdim=True) / 448
    q13, q2 = (w13.float() / s13).to(FP8), (w2.float() / s2).to(FP8)
    rows = []
    for t in sz.moe_tokens:
        x, gate = _randn(sz, t, h), _randn(sz, e, h) * 0.02
        weights, ids = moe_route.moe_route(x, gate, torch.zeros(e, device=sz.dev), k, 1, 1, True, 1.8)
        used = int(torch.unique(ids).numel())
        print(f"fused_moe T={t}: routing touched {used} of {e} experts", file=sys.stderr)
        for name, a, b, sa, sb, elt in (("fp8", q13, q2, s13, s2, 1), ("bf16", w13, w2, None, None, 2)):
            fn = lambda: fused_moe.fused_experts(x, a, b, weights, ids, sa, sb)  # noqa: E731
            shape = f"T{t} E{e} H{h} I{i} k{k} ({used} experts used)"
            if t == sz.moe_tokens[0]:
                rows.append(_mem(f"fused_moe {name} decode", shape, fn, used * 3 * h * i * elt, ceil,
                                 ">=0.6 of HBM on weight bytes" if name == "fp8" else ""))
            else:
                key = "fp8_TFLOPs" if name == "fp8" else "bf16_TFLOPs"
                rows.append(_flop(f"fused_moe {name} prefill", shape, fn, 2 * t * k * 3 * h * i, ceil, key, ""))
    t, e, h = sz.router
    xr, gr, zero = _randn(sz, t, h), _randn(sz, e, h), torch.zeros(e, device=sz.dev)
    rows.append(_mem("moe_route (fp32 GEMM + kernel)", f"T{t} E{e} H{h}", lambda: moe_route.moe_route(
        xr, gr, zero, 8 if e >= 8 else 2, 1, 1, True, 1.0), t * h * 2 + e * h * 2, ceil, ""))
    return rows


def _batch(sz: Sizes, num_seqs, ctx, q_len, page_size=16):
    per = -(-ctx // page_size)
    perm = torch.randperm(num_seqs * per).tolist()
    seqs = [([1] * q_len, ctx - q_len, perm[b * per:(b + 1) * per]) for b in range(num_seqs)]
    mode = ForwardMode.DECODE if q_len == 1 else ForwardMode.PREFILL
    return ForwardBatch.build(mode, seqs, page_size, device=sz.dev), num_seqs * per * page_size


def attention_rows(ceil, sz: Sizes) -> list[Row]:
    hq, hk, d, _ = sz.heads
    b, ctx = sz.decode
    batch, slots = _batch(sz, b, ctx, 1)
    kv, q = _randn(sz, 2, slots, hk, d), _randn(sz, b, hq, d)
    rows = [_mem("decode attn GQA (Air)", f"B{b} ctx{ctx} Hq{hq} Hkv{hk} d{d}", lambda: paged_attention.paged_attention(
        q, kv[0], kv[1], batch, 16, d ** -0.5), 2 * slots * hk * d * 2, ceil, ">=0.7 of HBM on KV bytes")]
    mh, lat_dim, rope_dim = sz.mla
    lat, qm = _randn(sz, slots, 1, lat_dim + rope_dim), _randn(sz, b, mh, lat_dim + rope_dim)
    rows.append(_mem("decode attn MLA (Flash)", f"B{b} ctx{ctx} H{mh} {lat_dim}+{rope_dim}",
                     lambda: paged_attention.paged_attention(qm, lat, lat[..., :lat_dim], batch, 16, 0.0625),
                     slots * (lat_dim + rope_dim) * 2, ceil, ">=0.7 of HBM on KV bytes"))
    n, length = sz.prefill
    pb, pslots = _batch(sz, n, length, length)
    kvp, qp = _randn(sz, 2, pslots, hk, d), _randn(sz, n * length, hq, d)
    flops = n * 2 * 2 * hq * d * length * length / 2  # causal: half the QK^T and PV work
    rows.append(_flop("prefill attn GQA (Air)", f"{n} x {length} causal", lambda: paged_attention.paged_attention(
        qp, kvp[0], kvp[1], pb, 16, d ** -0.5), flops, ceil, "bf16_TFLOPs", ""))
    layers, pages, sent = sz.kv_pages
    buf = _randn(sz, layers, 2, pages, 16, hk, d)
    ids = torch.randperm(pages, device=sz.dev)[:sent]
    rows.append(_mem("kv gather_pages", f"{layers}L x {sent} pages (Air)", lambda: kv_pages.gather_pages(buf, ids),
                     2 * layers * 2 * sent * 16 * hk * d * 2, ceil, ">=0.8"))
    return rows


def table(rows: list[Row], ceil: dict[str, float]) -> str:
    lines = [f"ceilings: HBM copy {ceil['hbm_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
             f"fp8 _scaled_mm {ceil['fp8_TFLOPs']:.0f} TFLOP/s", "",
             "| kernel | shape | ms | achieved | of ceiling | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.shape} | {r.ms:.3f} | {r.achieved:.0f} {r.unit} | "
                     f"{r.fraction:.2f} x {r.ceiling} | {r.target} |")
    return "\n".join(lines)


def run_sections(ceil: dict[str, float], sz: Sizes) -> list[Row]:
    """Every section; one that fails adds an ERROR row instead of hiding the others' numbers."""
    rows: list[Row] = []
    for section in (elementwise_rows, gemm_rows, moe_rows, attention_rows):
        try:
            rows += section(ceil, sz)
        except Exception as e:  # noqa: BLE001
            print(f"{section.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append(Row("ERROR", f"{section.__name__}: {type(e).__name__}: {str(e)[:80]}", 0, 0, "", "", 0, ""))
        if sz.dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer GEMM shapes, no MoE prefill")
    args = ap.parse_args()
    torch.manual_seed(0)
    ceil = ceilings()
    rows = run_sections(ceil, QUICK if args.quick else REAL)
    print(table(rows, ceil))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out, "w") as f:
        json.dump({"info": info, "ceilings": ceil, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
