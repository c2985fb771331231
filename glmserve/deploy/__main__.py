"""`python -m glmserve.deploy up|down|render`: start, stop or just render the fleet of one node under supervisord.

    python -m glmserve.deploy up                       # CPU demo: router + 1 prefill + 1 decode, embedded tiny model
    python -m glmserve.deploy up --device cuda --model_dir DIR --prefill 1 --decode 1 --tp 4
    python -m glmserve.deploy status
    python -m glmserve.deploy down
    python -m glmserve.deploy render --device cuda --prefill 2 --decode 2 --tp 2 --out fleet.conf

Runs in the operator's shell; the fleet's processes are supervisord's children. Multi-node
templates (addresses from environment variables) are in deploy/multinode/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from glmserve.deploy.plan import FleetSpec

# The state dir (config, logs, socket, default model) is under the directory `up` runs in; the
# programs run there too, so no folder beside the checkout's packages is on their sys.path.
DEFAULT_STATE = ".state"


def visible_gpus() -> int:
    """GPUs this node's workers can see (CUDA_VISIBLE_DEVICES, else nvidia-smi -L); 0 if unknown."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([g for g in env.split(",") if g.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    names = {f"--{name}", f"--{name.replace('_', '-')}"}
    p.add_argument(*sorted(names, key=len, reverse=True), dest=name, **kw)


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "model_dir", default="", help="HF checkpoint dir; default: the embedded tiny model")
    _flag(p, "preset", default="", help="a real config with random weights (implies --load-format dummy): "
          "a name in deploy/model_configs/, e.g. glm-4.7-flash")
    _flag(p, "state_dir", default=DEFAULT_STATE, help="config, logs, pid, socket, default model")
    _flag(p, "host", default="127.0.0.1")
    _flag(p, "port", type=int, default=8000)
    _flag(p, "port_base", type=int, default=5600, help="events port; worker ports follow (deploy/plan.py)")
    _flag(p, "health_base", type=int, default=8100)
    _flag(p, "device", default="cpu", choices=["cpu", "cuda"])
    _flag(p, "prefill", type=int, default=1, help="prefill workers")
    _flag(p, "decode", type=int, default=1, help="decode workers")
    _flag(p, "tp", type=int, default=1)
    _flag(p, "prefill_gpus", default="", help='GPU groups, e.g. "0,1;2,3" (default: in order)')
    _flag(p, "decode_gpus", default="")
    _flag(p, "kv_transport", default="auto", choices=["auto", "nccl", "gloo", "cuda_ipc"],
          help="KV link of every pair: auto = cuda_ipc when a pair shares a GPU, else nccl (gloo on cpu)")
    _flag(p, "load_format", default="auto", choices=["auto", "dummy"])
    _flag(p, "dtype", default="")
    _flag(p, "page_size", type=int, default=16)
    _flag(p, "num_pages", type=int, default=0)
    _flag(p, "gpu_memory_utilization", type=float, default=0.0,
          help="cuda: each worker's share of its GPU's memory, weights included; sizes its KV cache instead of "
               "--num_pages (prefill and decode on one GPU: e.g. 0.45 each)")
    _flag(p, "chunked_prefill_size", type=int, default=0, help="0: the prefill worker's default (8192 cuda, 512 cpu)")
    _flag(p, "max_running", type=int, default=64)
    _flag(p, "mtp_step", type=int, default=0)
    _flag(p, "mtp_mode", default="vanilla_with_att", choices=["vanilla_with_att", "eagle_with_att"])
    _flag(p, "expert_stats", action="store_true",
          help="workers export experts touched per MoE layer (load tests print them); costs one scatter_add "
               "per MoE layer per step")
    _flag(p, "disable_shared_experts_fusion", action="store_true",
          help="workers run each MoE layer's shared expert as its own MLP (default: the fused experts' last slot)")
    _flag(p, "disable_overlap_schedule", action="store_true",
          help="decode workers read each step back before launching the next (default: overlap loop)")
    _flag(p, "tool_call_parser", default="")
    _flag(p, "reasoning_parser", default="")
    _flag(p, "served_model_name", default="")
    _flag(p, "max_queue", type=int, default=0, help="router: requests waiting for a decode reservation")
    _flag(p, "max_req_total_len", type=int, default=0)
    _flag(p, "tokenizer", default="")
    _flag(p, "quantization", default="")
    _flag(p, "cpu_threads", type=int, default=1)
    _flag(p, "start_retries", type=int, default=5, help="restarts of a program that dies at start before FATAL")
    _flag(p, "mps", default="auto", choices=["auto", "on", "off"],
          help="cuda: run the workers as clients of a CUDA MPS daemon private to the fleet; auto = where two "
               "workers share a GPU (one-GPU nodes) and nvidia-cuda-mps-control is on PATH")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glmserve.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="render the config, run supervisord in the foreground")
    _fleet_flags(up)
    _flag(up, "ready_timeout", type=float, default=900.0, help="seconds to wait for the router's /readyz")
    _flag(up, "detach", action="store_true", help="return once ready; stop later with `down`")
    render = sub.add_parser("render", help="print or write the supervisord config only")
    _fleet_flags(render)
    _flag(render, "out", default="", help="file to write (default: stdout)")
    down = sub.add_parser("down", help="stop the fleet started by `up`")
    _flag(down, "state_dir", default=DEFAULT_STATE)
    st = sub.add_parser("status", help="supervisorctl status of the fleet's programs")
    _flag(st, "state_dir", default=DEFAULT_STATE)
    return p


def spec_from_args(a: argparse.Namespace, model_dir: str) -> FleetSpec:
    return FleetSpec(
        python=sys.executable, workdir=os.path.abspath(a.state_dir), state_dir=os.path.abspath(a.state_dir), model_dir=model_dir,
        host=a.host, port=a.port, port_base=a.port_base, health_base=a.health_base, device=a.device,
        num_prefill=a.prefill, num_decode=a.decode, tp=a.tp, load_format=a.load_format, dtype=a.dtype,
        page_size=a.page_size, num_pages=a.num_pages, gpu_memory_utilization=a.gpu_memory_utilization,
        chunked_prefill_size=a.chunked_prefill_size,
        max_running=a.max_running, mtp_step=a.mtp_step, mtp_mode=a.mtp_mode,
        overlap=not a.disable_overlap_schedule, expert_stats=a.expert_stats,
        fuse_shared_experts=not a.disable_shared_experts_fusion,
        tool_call_parser=a.tool_call_parser, reasoning_parser=a.reasoning_parser,
        served_model_name=a.served_model_name, tokenizer=a.tokenizer, max_queue=a.max_queue,
        max_req_total_len=a.max_req_total_len, quantization=a.quantization,
        prefill_gpus=a.prefill_gpus, decode_gpus=a.decode_gpus, cpu_threads=a.cpu_threads,
        num_gpus=visible_gpus() if a.device == "cuda" else 0, kv_transport=a.kv_transport,
        start_retries=a.start_retries, mps=a.mps,
        mps_control=(shutil.which("nvidia-cuda-mps-control") or "") if a.device == "cuda" else "")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd in ("down", "status"):
        from glmserve.deploy import lifecycle

        return getattr(lifecycle, a.cmd)(os.path.abspath(a.state_dir))
    model_dir = os.path.abspath(a.model_dir) if a.model_dir else ""
    if a.preset:
        from glmserve.deploy.default_model import preset_names, write_preset

        if a.model_dir or a.preset not in preset_names():
            sys.exit(f"--preset: one of {preset_names()}, without --model_dir")
        model_dir, a.load_format = write_preset(os.path.abspath(a.state_dir), a.preset), "dummy"
    if not model_dir:
        if a.cmd == "up":
            from glmserve.deploy.default_model import ensure_default_model

            print("deploy: using the embedded tiny GLM-4.7-Flash-shaped model (random weights)", flush=True)
            model_dir = ensure_default_model(os.path.abspath(a.state_dir))
        else:
            model_dir = os.path.join(os.path.abspath(a.state_dir), "default_model")
    spec = spec_from_args(a, model_dir)
    if a.cmd == "render":
        from glmserve.deploy.render import render

        os.makedirs(os.path.join(spec.state_dir, "logs"), exist_ok=True)  # supervisord requires it
        text = render(spec, os.path.abspath(a.out) if a.out else "supervisord.conf")
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    from glmserve.deploy.lifecycle import up

    return up(spec, a.ready_timeout, os.path.abspath(a.state_dir) == os.path.abspath(DEFAULT_STATE), a.detach)


if __name__ == "__main__":
    sys.exit(main())
