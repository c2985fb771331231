"""The fleet of one node as data: which processes, their command lines, ports and GPU sets (deploy CLI process).

`FleetSpec` comes from `python -m glmserve.deploy up` flags; `plan(spec)` returns the `Program`s that the
supervisord template renders. Ports on one node (defaults match the contract's examples):
  router HTTP  --port (8000)
  events PULL  port_base (5600)            prefill i control  port_base + 1 + i
  decode j control  port_base + 11 + j     decode j KV link   port_base + 21 + j
  prefill i health  health_base + 1 + i    decode j health    health_base + 11 + j
so at most 10 prefill and 10 decode workers per node. GPU sets: prefill i takes `tp` GPUs, then
decode j; or the explicit `prefill_gpus` / `decode_gpus` lists (each "a,b;c,d": one group per worker).
Where two workers share a GPU (one-GPU nodes), an `mps` program (a CUDA MPS control daemon private to the
fleet) starts first and every worker is its client, so their kernels share the SMs instead of time slices.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

MAX_PER_ROLE = 10


def fleet_key_path(state_dir: str) -> str:
    """The fleet's control-message key (0600), written fresh by every `up` (shared/fleet_key.py)."""
    return os.path.join(state_dir, "fleet.key")


@dataclass(frozen=True)
class FleetSpec:
    python: str
    workdir: str
    state_dir: str
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    port_base: int = 5600
    health_base: int = 8100
    device: str = "cpu"
    num_prefill: int = 1
    num_decode: int = 1
    tp: int = 1
    load_format: str = "auto"
    dtype: str = ""  # "" -> float32 on cpu, bfloat16 on cuda
    page_size: int = 16
    num_pages: int = 0  # 0 -> 2048 on cpu (the tiny demo model: ~10 MB), 4096 on cuda
    gpu_memory_utilization: float = 0.0  # > 0: each worker's KV pages from its share of its GPU (overrides num_pages)
    chunked_prefill_size: int = 0  # 0 -> the prefill worker's default: 8192 on cuda, 512 on cpu
    max_running: int = 64
    mtp_step: int = 0
    mtp_mode: str = "vanilla_with_att"
    overlap: bool = True  # decode workers' overlap loop (False: --disable_overlap_schedule)
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    served_model_name: str = ""
    max_queue: int = 0  # 0 -> the router's default
    max_req_total_len: int = 0  # 0 -> the model's max_position_embeddings
    tokenizer: str = ""
    quantization: str = ""
    prefill_gpus: str = ""
    decode_gpus: str = ""
    cpu_threads: int = 1  # OMP_NUM_THREADS per worker on cpu
    num_gpus: int = 0  # GPUs visible on this node (0: unknown, assume enough)
    kv_transport: str = "auto"  # workers' --kv_transport
    expert_stats: bool = False  # workers' --expert_stats (experts touched per MoE layer in /metrics)
    fuse_shared_experts: bool = True  # False: workers' --disable_shared_experts_fusion
    start_retries: int = 5  # supervisord tries before a program that keeps dying is FATAL
    mps: str = "auto"  # "auto": a CUDA MPS daemon when two workers share a GPU and mps_control is set; "on"; "off"
    mps_control: str = ""  # the nvidia-cuda-mps-control binary found on PATH ("" = none)


@dataclass(frozen=True)
class Program:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    priority: int = 100
    startsecs: int = 1
    is_worker: bool = True
    ports: tuple[int, ...] = field(default=())


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def _gpu_groups(spec: FleetSpec) -> tuple[list[str], list[str]]:
    """Per-worker GPU lists ("0,1") for prefill and decode workers."""
    if spec.device != "cuda":
        return [""] * spec.num_prefill, [""] * spec.num_decode

    def explicit(text: str, count: int, role: str) -> list[str]:
        groups = [g.strip() for g in text.split(";") if g.strip()]
        if len(groups) != count or any(len(g.split(",")) != spec.tp for g in groups):
            raise ValueError(f"--{role}_gpus {text!r}: need {count} groups of {spec.tp} GPUs, ';'-separated")
        return groups

    t = spec.tp
    # In order; with fewer GPUs than the workers need (spec.num_gpus), the groups wrap around: on
    # one GPU prefill and decode share it, and their KV link is the same-GPU one (cuda_ipc).
    n = spec.num_gpus if spec.num_gpus >= t else 1 << 30
    auto = [",".join(str((i * t + k) % n) for k in range(t)) for i in range(spec.num_prefill + spec.num_decode)]
    pre = explicit(spec.prefill_gpus, spec.num_prefill, "prefill") if spec.prefill_gpus else auto[: spec.num_prefill]
    dec = explicit(spec.decode_gpus, spec.num_decode, "decode") if spec.decode_gpus else auto[spec.num_prefill:]
    for grp in pre + dec:
        if len(set(grp.split(","))) != t:
            raise ValueError(f"GPU group {grp!r} names a GPU twice")
    return pre, dec


def _worker_common(spec: FleetSpec, worker_id: str, control: int, health: int, gpus: str) -> list[str]:
    dtype = spec.dtype or ("bfloat16" if spec.device == "cuda" else "float32")
    num_pages = spec.num_pages or (4096 if spec.device == "cuda" else 2048)
    argv = ["--worker_id", worker_id, "--model_dir", spec.model_dir, "--load-format", spec.load_format,
            "--control_addr", tcp(spec.host, control), "--router_addr", tcp(spec.host, spec.port_base),
            "--health_port", str(health), "--device", spec.device, "--tp", str(spec.tp), "--dtype", dtype,
            "--page_size", str(spec.page_size), "--num_pages", str(num_pages)]
    argv += ["--quantization", spec.quantization] if spec.quantization else []
    argv += ["--gpu_memory_utilization", str(spec.gpu_memory_utilization)] if spec.gpu_memory_utilization else []
    argv += ["--kv_transport", spec.kv_transport] if spec.kv_transport != "auto" else []
    argv += ["--expert_stats"] if spec.expert_stats else []
    argv += [] if spec.fuse_shared_experts else ["--disable_shared_experts_fusion"]
    return argv + (["--gpus", gpus] if gpus else [])


def mps_dirs(spec: FleetSpec) -> tuple[str, str]:
    """The fleet's MPS pipe and log directories: short (the daemon's socket path is length-limited) and
    one pair per router port, so two fleets on a node never share a daemon."""
    base = f"/tmp/glmserve-mps-{spec.port}"
    return f"{base}/pipe", f"{base}/log"


def use_mps(spec: FleetSpec, pre_gpus: list[str], dec_gpus: list[str]) -> bool:
    """MPS when asked ("on"), or ("auto") when some GPU serves two workers and the daemon is installed.
    Measured on one H100 (runs 36-39, FP8 GLM-4.7-Flash, random 512/256, MPS on vs off): out tok/s +4.6 % at c256
    (3 pairs, each +4.5 to +4.7 %) and ~+3 % at c64 (4 pairs, once the ~7 % advantage of whichever mode ran second
    is taken out); decode ITL p50 ~1 ms higher (prefill kernels run beside the decode step instead of between
    steps) and, with KV full at c256, TTFT p99 higher."""
    if spec.device != "cuda" or spec.mps == "off":
        return False
    if spec.mps == "on":
        if not spec.mps_control:
            raise ValueError("--mps on: nvidia-cuda-mps-control is not on PATH")
        return True
    seen = [g for grp in pre_gpus + dec_gpus for g in grp.split(",")]
    return bool(spec.mps_control) and len(seen) != len(set(seen))


def _mps(spec: FleetSpec) -> Program:
    """The MPS control daemon in the foreground (-f); it starts the MPS server at the first client."""
    pipe, log = mps_dirs(spec)
    script = f"mkdir -p {pipe} {log} && exec {shlex.quote(spec.mps_control)} -f"
    env = (("CUDA_MPS_PIPE_DIRECTORY", pipe), ("CUDA_MPS_LOG_DIRECTORY", log))
    return Program("mps", ("/bin/sh", "-c", script), env, priority=5, is_worker=False)


def _env(spec: FleetSpec, mps: bool = False) -> tuple[tuple[str, str], ...]:
    env = [("PYTHONUNBUFFERED", "1"), ("GLMSERVE_FLEET_KEY_FILE", fleet_key_path(spec.state_dir))]
    if spec.device == "cpu":
        env.append(("OMP_NUM_THREADS", str(spec.cpu_threads)))
    if mps:  # the workers connect to the fleet's daemon, not a system-wide one
        pipe, log = mps_dirs(spec)
        env += [("CUDA_MPS_PIPE_DIRECTORY", pipe), ("CUDA_MPS_LOG_DIRECTORY", log)]
    return tuple(env)


def _decode_addrs(spec: FleetSpec) -> list[str]:
    return [f"d{j}={tcp(spec.host, spec.port_base + 11 + j)}" for j in range(spec.num_decode)]


def _router(spec: FleetSpec) -> Program:
    argv = [spec.python, "-m", "glmserve.router", "--host", spec.host, "--port", str(spec.port), "--model_dir",
            spec.model_dir, "--events_addr", tcp(spec.host, spec.port_base)]
    for i in range(spec.num_prefill):
        argv += ["--prefill", f"p{i}={tcp(spec.host, spec.port_base + 1 + i)}"]
    for d in _decode_addrs(spec):
        argv += ["--decode", d]
    for flag in ("tokenizer", "served_model_name", "tool_call_parser", "reasoning_parser", "max_queue",
                 "max_req_total_len"):
        if getattr(spec, flag):
            argv += [f"--{flag}", str(getattr(spec, flag))]
    return Program("router", tuple(argv), _env(spec), priority=10, is_worker=False, ports=(spec.port, spec.port_base))


def plan(spec: FleetSpec) -> list[Program]:
    """Router + prefill workers + decode workers of one node (and the MPS daemon where workers share a GPU), in
    start order (decode first: it hosts the link)."""
    if not (1 <= spec.num_prefill <= MAX_PER_ROLE and 1 <= spec.num_decode <= MAX_PER_ROLE):
        raise ValueError(f"--prefill and --decode must be 1..{MAX_PER_ROLE} per node")
    pre_gpus, dec_gpus = _gpu_groups(spec)
    mps = use_mps(spec, pre_gpus, dec_gpus)
    progs = [_mps(spec)] if mps else []
    for j in range(spec.num_decode):
        control, link, health = spec.port_base + 11 + j, spec.port_base + 21 + j, spec.health_base + 11 + j
        argv = [spec.python, "-m", "glmserve.decode_worker", *_worker_common(spec, f"d{j}", control, health, dec_gpus[j]),
                "--link_port", str(link), "--max_running", str(spec.max_running)]
        if spec.mtp_step:
            argv += ["--mtp_step", str(spec.mtp_step), "--mtp_mode", spec.mtp_mode]
        if not spec.overlap:
            argv += ["--disable_overlap_schedule"]
        progs.append(Program(f"decode_d{j}", tuple(argv), _env(spec, mps), priority=20, ports=(control, link, health)))
    for i in range(spec.num_prefill):
        control, health = spec.port_base + 1 + i, spec.health_base + 1 + i
        argv = [spec.python, "-m", "glmserve.prefill_worker", *_worker_common(spec, f"p{i}", control, health, pre_gpus[i]),
                "--chunked_prefill_size", str(spec.chunked_prefill_size)]
        for d in _decode_addrs(spec):
            argv += ["--decode", d]
        progs.append(Program(f"prefill_p{i}", tuple(argv), _env(spec, mps), priority=30, ports=(control, health)))
    return [_router(spec)] + progs
