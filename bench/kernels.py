"""Kernel benchmark (run on the GPU by bench/gpu_kernels.sh; never in CI).

Measures, in the same run, the ceilings (HBM copy GB/s counting read + write, the bf16 matmul peak,
the FP8 torch._scaled_mm peak), then each kernel at GLM-4.5-Air / GLM-4.7-Flash shapes as achieved
GB/s or TFLOP/s and as a fraction of its ceiling, next to the issue's target. Prints a markdown table
and writes JSON to --out. Times are medians of triton.testing.do_bench (CUDA events, warm).
    python -m bench.kernels --out /tmp/kernels.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import triton

from kernels import act_quant, fp8_gemm, fused_moe, kv_pages, moe_route, paged_attention, rmsnorm, rope
from shared.runner.batch import ForwardBatch, ForwardMode

DEV = "cuda"
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


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
    n = 1 << 28  # 512 MiB of bf16 per buffer, far over L2
    src, dst = torch.randn(n, device=DEV, dtype=BF16), torch.empty(n, device=DEV, dtype=BF16)
    hbm = 2 * src.numel() * 2 / bench_ms(lambda: dst.copy_(src)) / 1e6
    a, b = torch.randn(8192, 8192, device=DEV, dtype=BF16), torch.randn(8192, 8192, device=DEV, dtype=BF16)
    bf16 = 2 * 8192 ** 3 / bench_ms(lambda: a @ b) / 1e9
    a8, b8 = a.to(FP8), b.to(FP8).t()  # b column-major, as _scaled_mm wants
    one = torch.ones((), device=DEV)
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


def elementwise_rows(ceil, t: int) -> list[Row]:
    h = 4096
    x, r, w = (torch.randn(t, h, device=DEV, dtype=BF16) for _ in range(3))
    w = w[0].contiguous()
    rows = [
        _mem("rms_norm", f"{t}x{h}", lambda: rmsnorm.rms_norm(x, w, 1e-5), 2 * t * h * 2, ceil, ">=0.8"),
        _mem("add_rms_norm", f"{t}x{h}", lambda: rmsnorm.add_rms_norm(x, r, w, 1e-5), 4 * t * h * 2, ceil, ">=0.8"),
    ]
    q, k = torch.randn(t, 96, 128, device=DEV, dtype=BF16), torch.randn(t, 8, 128, device=DEV, dtype=BF16)
    pos = torch.randint(0, 4096, (t,), device=DEV)
    cos, sin = rope.cos_sin_cache(64, 4096, 1e6, DEV)
    rows.append(_mem("rope_inplace neox", f"q{t}x96x128 k{t}x8x128 rd64",
                     lambda: rope.rope_inplace(q, k, pos, cos, sin, 64, False), 2 * t * 104 * 64 * 2, ceil, ">=0.8"))
    i = 1408
    g = torch.randn(t, 2 * i, device=DEV, dtype=BF16)
    rows.append(_mem("silu_and_mul_fp8", f"{t}x{2 * i}", lambda: act_quant.silu_and_mul_fp8(g),
                     t * 2 * i * 2 + t * i + 4 * t, ceil, ">=0.8"))
    rows.append(_mem("silu_and_mul", f"{t}x{2 * i}", lambda: act_quant.silu_and_mul(g), t * 3 * i * 2, ceil, ">=0.8"))
    rows.append(_mem("quant_fp8_per_token", f"{t}x{h}", lambda: act_quant.quant_fp8_per_token(x),
                     t * h * 3 + 4 * t, ceil, ">=0.8"))
    return rows


def gemm_rows(ceil, ms_list, shapes) -> list[Row]:
    rows = []
    for m in ms_list:
        for n, k in shapes:
            a_q, a_s = act_quant.quant_fp8_per_token(torch.randn(m, k, device=DEV, dtype=BF16))
            w_q = torch.randn(n, k, device=DEV).to(FP8)
            w_s = torch.rand(n, 1, device=DEV) + 0.5
            flops = 2 * m * n * k
            mine = _flop("fp8_gemm per-channel", f"M{m} N{n} K{k}", lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s),
                         flops, ceil, "fp8_TFLOPs", "")
            ref_ms = bench_ms(lambda: torch._scaled_mm(a_q, w_q.t(), a_s, w_s.reshape(1, -1), out_dtype=BF16))
            mine.target = f">=0.8x _scaled_mm (ratio {ref_ms / mine.ms:.2f})" if m >= 2048 else f"ratio {ref_ms / mine.ms:.2f}"
            rows.append(mine)
    m, n, k = 2048, 4096, 4096
    a_q, a_s = act_quant.quant_fp8_group(torch.randn(m, k, device=DEV, dtype=BF16), 128)
    w_q, w_s = torch.randn(n, k, device=DEV).to(FP8), torch.rand(n // 128, k // 128, device=DEV) + 0.5
    rows.append(_flop("fp8_gemm block128", f"M{m} N{n} K{k}",
                      lambda: fp8_gemm.fp8_gemm(a_q, a_s, w_q, w_s, block=128), 2 * m * n * k, ceil, "fp8_TFLOPs", ""))
    return rows


def moe_rows(ceil, quick: bool) -> list[Row]:
    """GLM-4.7-Flash experts (E=64, H=2048, I=1536, top-4); weight bytes of the experts actually touched."""
    e, h, i, k = 64, 2048, 1536, 4
    w13 = torch.randn(e, 2 * i, h, device=DEV, dtype=BF16) * h ** -0.5
    w2 = torch.randn(e, h, i, device=DEV, dtype=BF16) * i ** -0.5
    s13, s2 = w13.float().abs().amax(-1, keepdim=True) / 448, w2.float().abs().amax(-1, keepdim=True) / 448
    q13, q2 = (w13.float() / s13).to(FP8), (w2.float() / s2).to(FP8)
    rows = []
    for t in (256,) if quick else (256, 4096):
        x = torch.randn(t, h, device=DEV, dtype=BF16)
        gate = torch.randn(e, h, device=DEV, dtype=BF16) * 0.02
        weights, ids = moe_route.moe_route(x, gate, torch.zeros(e, device=DEV), k, 1, 1, True, 1.8)
        used = int(torch.unique(ids).numel())
        print(f"fused_moe T={t}: routing touched {used} of {e} experts", file=sys.stderr)
        for name, a, b, sa, sb, elt in (("fp8", q13, q2, s13, s2, 1), ("bf16", w13, w2, None, None, 2)):
            fn = lambda: fused_moe.fused_experts(x, a, b, weights, ids, sa, sb)  # noqa: E731
            shape = f"T{t} E{e} H{h} I{i} k{k} ({used} experts used)"
            if t <= 256:
                rows.append(_mem(f"fused_moe {name} decode", shape, fn, used * 3 * h * i * elt, ceil,
                                 ">=0.6 of HBM on weight bytes" if name == "fp8" else ""))
            else:
                key = "fp8_TFLOPs" if name == "fp8" else "bf16_TFLOPs"
                rows.append(_flop(f"fused_moe {name} prefill", shape, fn, 2 * t * k * 3 * h * i, ceil, key, ""))
    xr, gr = torch.randn(4096, 4096, device=DEV, dtype=BF16), torch.randn(128, 4096, device=DEV, dtype=BF16)
    zero = torch.zeros(128, device=DEV)
    rows.append(_mem("moe_route (fp32 GEMM + kernel)", "T4096 E128 H4096", lambda: moe_route.moe_route(
        xr, gr, zero, 8, 1, 1, True, 1.0), 4096 * 4096 * 2 + 128 * 4096 * 2, ceil, ""))
    return rows


def _batch(num_seqs, ctx, q_len, page_size=16):
    per = -(-ctx // page_size)
    perm = torch.randperm(num_seqs * per).tolist()
    seqs = [([1] * q_len, ctx - q_len, perm[b * per:(b + 1) * per]) for b in range(num_seqs)]
    mode = ForwardMode.DECODE if q_len == 1 else ForwardMode.PREFILL
    return ForwardBatch.build(mode, seqs, page_size, device=DEV), num_seqs * per * page_size


def attention_rows(ceil) -> list[Row]:
    rows = []
    batch, slots = _batch(64, 4096, 1)
    kv = torch.randn(2, slots, 8, 128, device=DEV, dtype=BF16)
    q = torch.randn(64, 96, 128, device=DEV, dtype=BF16)
    rows.append(_mem("decode attn GQA (Air)", "B64 ctx4096 Hq96 Hkv8 d128", lambda: paged_attention.paged_attention(
        q, kv[0], kv[1], batch, 16, 0.088), 2 * slots * 8 * 128 * 2, ceil, ">=0.7 of HBM on KV bytes"))
    lat = torch.randn(slots, 1, 576, device=DEV, dtype=BF16)
    qm = torch.randn(64, 20, 576, device=DEV, dtype=BF16)
    rows.append(_mem("decode attn MLA (Flash)", "B64 ctx4096 H20 576/512", lambda: paged_attention.paged_attention(
        qm, lat, lat[..., :512], batch, 16, 0.0625), slots * 576 * 2, ceil, ">=0.7 of HBM on KV bytes"))
    pb, pslots = _batch(4, 2048, 2048)
    kvp = torch.randn(2, pslots, 8, 128, device=DEV, dtype=BF16)
    qp = torch.randn(4 * 2048, 96, 128, device=DEV, dtype=BF16)
    flops = 4 * 2 * 2 * 96 * 128 * 2048 * 2048 / 2  # causal: half the QK^T and PV work
    rows.append(_flop("prefill attn GQA (Air)", "4 x 2048 causal", lambda: paged_attention.paged_attention(
        qp, kvp[0], kvp[1], pb, 16, 0.088), flops, ceil, "bf16_TFLOPs", ""))
    buf = torch.randn(46, 2, 1024, 16, 8, 128, device=DEV, dtype=BF16)
    ids = torch.randperm(1024, device=DEV)[:256]
    rows.append(_mem("kv gather_pages", "46L x 256 pages (Air)", lambda: kv_pages.gather_pages(buf, ids),
                     2 * 46 * 2 * 256 * 16 * 8 * 128 * 2, ceil, ">=0.8"))
    return rows


def table(rows: list[Row], ceil: dict[str, float]) -> str:
    lines = [f"ceilings: HBM copy {ceil['hbm_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
             f"fp8 _scaled_mm {ceil['fp8_TFLOPs']:.0f} TFLOP/s", "",
             "| kernel | shape | ms | achieved | of ceiling | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.shape} | {r.ms:.3f} | {r.achieved:.0f} {r.unit} | "
                     f"{r.fraction:.2f} x {r.ceiling} | {r.target} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer GEMM shapes, no MoE prefill")
    args = ap.parse_args()
    torch.manual_seed(0)
    ceil = ceilings()
    shapes = [(12288, 4096), (4096, 12288), (1024, 4096), (21888, 4096), (5120, 768)]  # Air q, o, k; mlp; Flash q_b
    sections = [
        lambda: elementwise_rows(ceil, 16384),
        lambda: gemm_rows(ceil, [64, 2048] if args.quick else [64, 2048, 4096], shapes[:3] if args.quick else shapes),
        lambda: moe_rows(ceil, args.quick),
        lambda: attention_rows(ceil),
    ]
    rows: list[Row] = []
    for section in sections:  # one failing kernel must not hide the others' numbers
        try:
            rows += section()
        except Exception as e:  # noqa: BLE001
            print(f"section failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append(Row("ERROR", f"{type(e).__name__}: {str(e)[:80]}", 0, 0, "", "", 0, ""))
        torch.cuda.empty_cache()
    print(table(rows, ceil))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out, "w") as f:
        json.dump({"info": info, "ceilings": ceil, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
