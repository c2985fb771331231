"""PNG plots of a run (latency CDFs) and of a sweep (throughput against latency); matplotlib Agg, client side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _cdf(ax, values_ms: list[float], title: str) -> None:
    if values_ms:
        v = np.sort(np.asarray(values_ms))
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), drawstyle="steps-post")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
    ax.grid(alpha=0.3)


def plot_latency_cdfs(result: dict, path: str) -> str:
    """2x2 CDFs of TTFT, TPOT, ITL and E2E latency from a result JSON dict; returns `path`."""
    ok = [i for i, e in enumerate(result["errors"]) if not e]
    ttft = [result["ttfts"][i] * 1e3 for i in ok]
    e2el = [result["e2els"][i] * 1e3 for i in ok]
    tpot = [(result["e2els"][i] - result["ttfts"][i]) * 1e3 / (result["output_lens"][i] - 1)
            for i in ok if result["output_lens"][i] > 1]
    itl = [g * 1e3 for i in ok for g in result["itls"][i]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, vals, name in zip(axes.flat, (ttft, tpot, itl, e2el), ("TTFT", "TPOT", "ITL", "E2E latency")):
        _cdf(ax, vals, name)
    tag = " (synthetic ShareGPT)" if result.get("synthetic") else ""
    fig.suptitle(f"{result['workload']} {result['dataset']}{tag}: {result['completed']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_sweep(results: list[dict], path: str, x_label: str) -> str:
    """Output tok/s against median and p99 TTFT / TPOT, one point per sweep value; returns `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    thr = [r["output_throughput"] for r in results]
    for ax, key in zip(axes, ("ttft", "tpot")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(thr, [r.get(f"{stat}_{key}_ms", 0.0) for r in results], style, label=f"{stat} {key.upper()}")
        for r, x in zip(results, thr):
            ax.annotate(str(r.get(x_label)), (x, r.get(f"median_{key}_ms", 0.0)), fontsize=7)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{key.upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    tag = " (synthetic ShareGPT)" if results and results[0].get("synthetic") else ""
    fig.suptitle(f"sweep over {x_label}{tag}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
