"""Helpers shared by the kernel launchers (imported by every worker rank that runs kernels)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


def check(cond: bool, msg: str) -> None:
    """Launcher argument check; raises ValueError (never assert: it must hold under python -O)."""
    if not cond:
        raise ValueError(msg)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def gpu_name(device: torch.device) -> str:
    """Key for the tuned-config tables ("cpu" under the interpreter)."""
    if device.type != "cuda":
        return "cpu"
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())[0]


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> tuple[str, int, int]:
    """(config-table name, SM count, compute capability major), read once per device (launch overhead)."""
    p = torch.cuda.get_device_properties(index)
    return p.name.replace("NVIDIA ", "").split(" ")[0], p.multi_processor_count, p.major


def sm_count(device: torch.device) -> int:
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())[1]


def cc_major(device: torch.device) -> int:
    return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())[2]


# The interpreter's fp32 -> fp8 cast loses the carry when rounding up across a power of two (127.9 -> 64),
# and its fp32 -> bf16 cast truncates. Kernels that store fp8 round onto the e4m3 grid first when
# interpreting (the cast is then exact); compiled kernels use the hardware's round-to-nearest-even cast.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def fp8_grid_round(x):
    """Round fp32 x (|x| <= 448) to the nearest e4m3 value (ties away from zero), still fp32."""
    ax = tl.abs(x)
    e = tl.floor(tl.log2(tl.maximum(ax, 0.015625)))  # 2^-6: below it, subnormal spacing 2^-9
    step = tl.exp2(e - 3.0)
    r = tl.floor(ax / step + 0.5) * step
    return tl.where(x < 0, -r, r)


# Programmatic dependent launch (sm_90+): a kernel launched with launch_pdl may start while its predecessor in
# the stream still runs (the predecessor's programs trigger it once past their own wait, pdl_enter) and waits
# in-kernel (gdc_wait) until every prior grid has completed and its writes are visible, before it touches
# global memory. That hides part of the
# gap between dependent launches in a CUDA graph. Every PDL-launched kernel calls pdl_enter first, on every
# path, so completion stays transitive (a grid completes only after the grids it waited on). Off under the
# interpreter; GLMSERVE_PDL=0 turns it off (A/B: bench/profile_step.py --pdl off).
PDL_ENABLED = not INTERPRET and os.environ.get("GLMSERVE_PDL", "1") != "0"


# Launches with more rows than this (tokens, or (token, expert) pairs for the MoE kernels) run without PDL. H100
# run 27 (bench/gpu_suite.sh h100i, FP8 GLM-4.7-Flash step, PDL on / off alternated): B 1 4.67 -> 4.19-4.21 ms,
# B 64 / 128 within noise, B 256 19.11-19.23 -> 19.70-19.95 (the small kernels' sum 2.6 -> 3.3 ms): on at decode
# batches of a few sequences only.
PDL_MAX_ROWS = 32


# Launches with more rows than PDL_MAX_ROWS: PDL_LATE launches them with PDL too, but their programs never
# trigger the next launch early (pdl_enter only waits): the next kernel's launch begins as this grid's last
# programs exit (the implicit trigger) instead of after the grid completes and its writes are flushed, and no
# waiting program of the next kernel takes an SM slot from a running wave (run 27's loss with the early
# trigger). Measured no gain, so off: H100 run 32 (bench/ab_step.py --switch pdl_late, FP8 GLM-4.7-Flash step,
# median graph ms on / off) B 64 15.11 / 15.14, B 128 16.21 / 16.13, B 256 19.34 / 19.36, logits bit-equal.
# GLMSERVE_PDL_LATE=1 turns it on.
PDL_LATE = os.environ.get("GLMSERVE_PDL_LATE", "0") == "1"


def pdl_kw(device: torch.device, rows: int) -> dict:
    """Launch keywords of a kernel with a PDL constexpr: PDL= (its pdl_enter: 0 off, 1 wait then trigger the
    next launch, 2 wait only) and launch_pdl= together; rows: the launch's tokens (or pairs), against
    PDL_MAX_ROWS (above it: mode 2 with PDL_LATE, else off)."""
    if not (PDL_ENABLED and device.type == "cuda" and cc_major(device) >= 9):
        return {"PDL": 0, "launch_pdl": False}
    mode = 1 if rows <= PDL_MAX_ROWS else 2 if PDL_LATE else 0
    return {"PDL": mode, "launch_pdl": mode > 0}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of a kernel that may be PDL-launched: wait for the prior grids (before any global
    load or store: read-after-write and write-after-read both), then (PDL 1) let the next kernel's launch begin.
    Wait first: with the trigger first (H100 run 26) every kernel's programs triggered the next at entry, so
    the CUDA graph's later kernels piled their waiting programs onto the SMs while an earlier one still ran
    (B 1 4.68 -> 4.33-4.57 ms but B 256 19.14 -> 19.47-20.59); after the wait at most the next kernel waits.
    PDL 2 (PDL_LATE): the wait only; the program's exit is its trigger."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


# The interpreter's tl.dot on bf16 operands returns garbage (triton 3.9, numpy has no bf16): under the
# interpreter kernels upcast 16-bit dot operands to fp32 (the products are exact either way).
@triton.jit
def dot_in(x, UPCAST: tl.constexpr):
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 operands (the fp32 reference model on CUDA, tests) multiply in full fp32,
    not TF32 (10-bit mantissa: GQA attention alone put the tiny fp32 model 0.096 off its refs, H100 run 15);
    16-bit and fp8 operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Per device: int32 arrival counters for kernels whose last program to arrive finishes the launch's work (inline
# split-K in fp8_gemm, the one-launch router in moe_route_align), zero between launches: the finisher resets
# its counters. Shared by every such launch on the device, which is safe because they run one after another
# (one compute stream; a PDL launch waits for the previous grid before its first memory access). Allocated
# outside CUDA graph capture (a capture would record the zero fill, not run it); a launch that needs more
# counters than there are, or the first one on a device during a capture, gets None and takes its other path.
ARRIVAL_COUNTERS = 4096
_arrival: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    buf = _arrival.get(device)
    if buf is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        buf = _arrival[device] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
    return buf if buf is not None and needed <= buf.numel() else None


def k_splits(k_blocks: int, want: int) -> tuple[int, int]:
    """(splits, K blocks a split) for `want` splits of k_blocks: at most k_blocks, none empty (fp8_gemm's split-K,
    the one-launch router's logits)."""
    per_split = cdiv(k_blocks, max(1, min(want, k_blocks)))
    return cdiv(k_blocks, per_split), per_split


@triton.jit
def splitk_arrive(cnt_p):
    """Inline split-K (fp8_gemm's pointer kernel, the one-launch router's logits), after a split has stored its
    fp32 partial: count it on the tile's counter cnt_p (bar.sync so every thread's stores precede the count, then a
    gpu-scope acq_rel add). Returns the arrival index: the tile's last split sees SPLIT_K - 1 and finishes the tile
    with splitk_sum."""
    tl.debug_barrier()
    return tl.atomic_add(cnt_p, 1, sem="acq_rel")


@triton.jit
def splitk_sum(tile_p, tile_ok, cnt_p, M, N, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               RELAXED: tl.constexpr):
    """The last split's sum of the tile's partials part[0..SPLIT_K) (tile_p: part[0]'s [BLOCK_M, BLOCK_N] pointers)
    in split order, then the counter reset for the next launch. The loads are unrolled, so they go out together, and
    .cg: from L2, where the other SMs' partials are (never a stale L1 line). CUDA graph replays reuse the counters; a
    kernel boundary or PDL's wait orders the reset before the next launch's counts, so RELAXED (a relaxed exchange)
    keeps the epilogue from waiting on it; else the default acq_rel one."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(tile_p + s * M * N, mask=tile_ok, other=0.0, cache_modifier=".cg")
    if RELAXED:
        tl.atomic_xchg(cnt_p, 0, sem="relaxed")
    else:
        tl.atomic_xchg(cnt_p, 0)
    return acc


POISON = os.environ.get("KERNELS_POISON", "0") == "1"  # tests: every output starts as NaN / garbage


def new_out(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; filled with NaN (floats) or 0x7F bytes (fp8 NaN) when POISON is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point and t.element_size() > 1:
            t.fill_(float("nan"))
        else:
            t.view(torch.uint8).fill_(0x7F) if t.numel() else None
    return t


@triton.jit
def rope_pair(i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Offsets of the two dims rotation pair i rotates: interleaved (2i, 2i + 1), NeoX (i, i + HALF). Every
    RoPE kernel writes the pair back de-interleaved, at (i, i + HALF), as HF does."""
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + HALF
    return i1, i2
