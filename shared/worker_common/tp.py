"""Tensor parallelism inside one worker: start follower ranks, build the TP group, fan out steps.

The leader (rank 0, the process the user started) spawns ranks 1..N-1 as child processes of
the same command with `--tp_rank i --tp_store_port P`; they die with it (PR_SET_PDEATHSIG, and
a broken fan-out broadcast ends their loop). All ranks join one torch.distributed default group
(gloo on CPU, NCCL on CUDA: the model's all-reduces) over a TCPStore hosted by the leader, plus a
gloo group that carries the step plans: length, then msgspec bytes, by broadcast from rank 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from glmserve.shared.ports import free_port, hosted_store


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_followers(module: str, argv: list[str], tp_size: int, store_port: int) -> list[subprocess.Popen]:
    """Start ranks 1..tp_size-1 running `python -m module argv --tp_rank i --tp_store_port P`."""
    procs = []
    for rank in range(1, tp_size):
        cmd = [sys.executable, "-m", module, *argv, "--tp_rank", str(rank), "--tp_store_port", str(store_port)]
        procs.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))
    return procs


class TPFanout:
    """The TP group of one worker; `share(plan_bytes)` on rank 0 == `share(None)` on others."""

    def __init__(self, tp_rank: int, tp_size: int, store_port: int, device: str, timeout_s: float = 600):
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if tp_size == 1:
            self.plan_group = None
            return
        if tp_rank == 0:  # the group's ranks are on this host: the store listens on loopback only
            store = hosted_store("127.0.0.1", store_port, timeout_s, world_size=tp_size, wait_for_workers=True)
        else:
            store = dist.TCPStore("127.0.0.1", store_port, tp_size, False, timedelta(seconds=timeout_s))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=store, rank=tp_rank, world_size=tp_size,
                                timeout=timedelta(seconds=timeout_s))
        self.plan_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD

    def share(self, data: bytes | None) -> bytes:
        """Broadcast rank 0's bytes to every rank (rank 0 passes them, others pass None)."""
        if self.tp_size == 1:
            assert data is not None
            return data
        n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.plan_group)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if self.tp_rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.plan_group)
        return buf.numpy().tobytes()

    def close(self) -> None:
        if self.tp_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def leader_store_port(tp_size: int, given: int) -> int:
    return given or (free_port() if tp_size > 1 else 0)


def strip_tp_flags(argv: list[str]) -> list[str]:
    """argv without --tp_rank/--tp-rank/--tp_store_port and their values (followers get new ones)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0].replace("-", "_")
        if key in ("__tp_rank", "__tp_store_port"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
