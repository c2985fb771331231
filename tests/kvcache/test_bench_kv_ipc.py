"""bench/kv_ipc.py between two real processes: the decode maps the prefill's cache (shared memory on
CPU, CUDA IPC on one GPU) and the pages it copies are the prefill's, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "kv_ipc.json"
    proc = subprocess.run([sys.executable, "-m", "bench.kv_ipc", *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_cpu_shared_memory_pair(tmp_path):
    rows = _run(tmp_path, "--device", "cpu", "--tokens", "64,256", "--num_layers", "3", "--reps", "1")
    assert [(r["mode"], r["tokens"]) for r in rows] == [("contiguous", 64), ("contiguous", 256), ("scattered", 64),
                                                          ("scattered", 256)]
    assert all(r["bytes_ok"] for r in rows)
    assert all(r["link_ms"] > 0 and r["device_copy_gbps"] > 0 for r in rows)


@pytest.mark.gpu
def test_one_gpu_cuda_ipc_pair(tmp_path):
    rows = _run(tmp_path, "--tokens", "1024,4096", "--reps", "2")
    assert all(r["bytes_ok"] for r in rows)
    assert all(r["kernel_vs_copy"] > 0.5 for r in rows)  # the copy itself runs near the copy ceiling
