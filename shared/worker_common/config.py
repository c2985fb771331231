"""CLI parsing and frozen config for the worker processes (prefill and decode, every TP rank).

Flags keep the names users know from the seeds (`--model_dir`, `--tp`, `--chunked_prefill_size`...);
each flag is accepted with dashes and with underscores. `parse_peers` reads `id=tcp://host:port`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


def add_flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """Add `--a_b` and `--a-b` as one option (dest a_b)."""
    under = "--" + name.replace("-", "_")
    dash = "--" + name.replace("_", "-")
    names = [under] if under == dash else [under, dash]
    p.add_argument(*names, dest=name.replace("-", "_"), **kw)


def parse_peers(items: list[str] | None) -> dict[str, str]:
    """["d0=tcp://127.0.0.1:5611", ...] -> {"d0": "tcp://127.0.0.1:5611"}."""
    peers: dict[str, str] = {}
    for item in items or []:
        wid, sep, addr = item.partition("=")
        if not sep or not wid or not addr.startswith("tcp://"):
            raise ValueError(f"bad peer {item!r}; expected id=tcp://host:port")
        peers[wid] = addr
    return peers


def addr_host(addr: str) -> str:
    """tcp://host:port -> host ("*" and 0.0.0.0 -> 127.0.0.1)."""
    host = addr.removeprefix("tcp://").rsplit(":", 1)[0]
    return "127.0.0.1" if host in ("*", "0.0.0.0") else host


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs (both roles)."""

    role: str  # "prefill" | "decode"
    worker_id: str
    model_dir: str
    load_format: str
    control_addr: str  # leader binds a PULL here
    router_addr: str  # leader connects a PUSH here
    health_port: int
    device: str  # "cpu" | "cuda"
    gpus: tuple[int, ...]  # one per TP rank (cuda only)
    tp_size: int
    dtype: str
    page_size: int
    num_pages: int  # KV pages, unless gpu_memory_utilization sizes them (Engine.num_pages has the count)
    quantization: str | None
    heartbeat_s: float = 0.5
    mtp_step: int = 0  # decode: MTP draft tokens per step (0 = plain decoding)
    kv_transport: str = "auto"  # auto | nccl | gloo | cuda_ipc (shared/kvcache/rendezvous.pick_transport)
    expert_stats: bool = False  # leader: export experts touched per MoE layer (shared/worker_common/expert_stats.py)
    fuse_shared_experts: bool = True  # MoE shared expert as the fused experts' last slot (shared/model/layers/moe.py)
    gpu_memory_utilization: float = 0.0  # > 0 on cuda: KV pages from this share of the GPU (kv_budget.py)
    # TP follower only: which rank this process is and where the leader's TP store listens
    tp_rank: int = 0
    tp_store_port: int = 0

    def device_for_rank(self, rank: int) -> str:
        if self.device != "cuda":
            return "cpu"
        return f"cuda:{self.gpus[rank] if self.gpus else rank}"


def common_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m glmserve.{role}_worker")
    add_flag(p, "worker_id", default=role[0] + "0")
    add_flag(p, "model_dir", required=True)
    add_flag(p, "load_format", default="auto", choices=["auto", "dummy"])
    add_flag(p, "control_addr", required=True)
    add_flag(p, "router_addr", required=True)
    add_flag(p, "health_port", type=int, default=0)
    add_flag(p, "device", default="cpu", choices=["cpu", "cuda"])
    add_flag(p, "gpus", default="")
    add_flag(p, "tp", type=int, default=1)
    add_flag(p, "dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_flag(p, "page_size", type=int, default=16)
    add_flag(p, "num_pages", type=int, default=512)
    add_flag(p, "gpu_memory_utilization", type=float, default=0.0,
             help="cuda: size the KV cache so this process holds at most this fraction of the GPU's memory, "
                  "weights included (vLLM's flag; two workers sharing a GPU take e.g. 0.45 each); overrides "
                  "--num_pages; 0 = use --num_pages; ignored on cpu")
    p.add_argument("--mem_fraction_static", "--mem-fraction-static", dest="gpu_memory_utilization", type=float,
                   default=argparse.SUPPRESS, help="alias of --gpu_memory_utilization (SGLang's name)")
    add_flag(p, "quantization", default=None)
    add_flag(p, "heartbeat_s", type=float, default=0.5)
    add_flag(p, "kv_transport", default="auto", choices=["auto", "nccl", "gloo", "cuda_ipc", "ipc"],
             help="KV link: auto = cuda_ipc when prefill and decode share a GPU, else nccl (gloo on cpu); "
                  "cuda_ipc (ipc) = same host, one device copy per push (shared memory on cpu)")
    add_flag(p, "mtp_step", type=int, default=0, help="decode: MTP draft tokens per step (0 = off); ignored by prefill workers")
    p.add_argument("--num_speculative_tokens", "--num-speculative-tokens", dest="mtp_step", type=int,
                   default=argparse.SUPPRESS, help="alias of --mtp_step (vLLM's name)")
    add_flag(p, "expert_stats", action="store_true",
             help="count tokens per expert per MoE layer (one scatter_add per layer per forward) and export "
                  "experts touched per layer per heartbeat (glm_worker_moe_experts_touched)")
    add_flag(p, "disable_shared_experts_fusion", action="store_true",
             help="run each MoE layer's shared expert as its own MLP instead of the fused experts' last slot "
                  "(SGLang's flag name; the default fuses it: 6 fewer launches per layer at FP8 decode)")
    add_flag(p, "tp_rank", type=int, default=0, help=argparse.SUPPRESS)
    add_flag(p, "tp_store_port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def worker_config(role: str, a: argparse.Namespace) -> WorkerConfig:
    gpus = tuple(int(g) for g in a.gpus.split(",") if g.strip()) if a.gpus else ()
    if a.tp < 1:
        raise ValueError("--tp must be >= 1")
    if not 0 <= a.mtp_step <= 4:
        raise ValueError(f"--mtp_step {a.mtp_step}: expected 0 (off) .. 4")
    if gpus and len(gpus) != a.tp:
        raise ValueError(f"--gpus lists {len(gpus)} GPUs but --tp is {a.tp}")
    return WorkerConfig(
        role=role, worker_id=a.worker_id, model_dir=a.model_dir, load_format=a.load_format,
        control_addr=a.control_addr, router_addr=a.router_addr, health_port=a.health_port,
        device=a.device, gpus=gpus, tp_size=a.tp, dtype=a.dtype, page_size=a.page_size,
        num_pages=a.num_pages, quantization=a.quantization, heartbeat_s=a.heartbeat_s,
        tp_rank=a.tp_rank, tp_store_port=a.tp_store_port, mtp_step=a.mtp_step, kv_transport=a.kv_transport,
        expert_stats=a.expert_stats, fuse_shared_experts=not a.disable_shared_experts_fusion,
        gpu_memory_utilization=a.gpu_memory_utilization,
    )
