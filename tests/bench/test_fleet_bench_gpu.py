"""On 2 GPUs: `deploy up --device cuda` (prefill on GPU 0, decode on GPU 1, NCCL KV link) and a short burst
load test whose server-side KV transfer figure must be non-zero. Skipped without 2 CUDA devices."""

import os
import subprocess
import sys

import pytest
import torch

from bench.sharegpt.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("preset,input_len", [("", 1024), ("glm-4.7-flash", 1024)])
def test_gpu_fleet_burst(tmp_path, preset, input_len):
    """Tiny default model, then GLM-4.7-Flash's real shapes with dummy weights (bf16, ~60 GB per worker)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    try:
        from tests.deploy.fleet_ports import fleet_ports
    except ImportError:  # tests/ is not importable as a package
        sys.path.insert(0, os.path.join(REPO, "tests", "deploy"))
        from fleet_ports import fleet_ports

    port, port_base, health_base = fleet_ports()
    state = str(tmp_path / "state")
    model_flags = ["--preset", preset] if preset else []
    up = subprocess.run([sys.executable, "-m", "glmserve.deploy", "up", "--detach", "--device", "cuda", "--state_dir", state,
                         "--port", str(port), "--port_base", str(port_base), "--health_base", str(health_base),
                         "--ready_timeout", "500", *model_flags], cwd=REPO, capture_output=True, text=True, timeout=560)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        metrics = [f"http://127.0.0.1:{p}/metrics" for p in (port, health_base + 1, health_base + 11)]
        args = ["--base-url", f"http://127.0.0.1:{port}", "--dataset", "random", "--random-input-len", str(input_len),
                "--random-output-len", "64", "--num-prompts", "32", "--ignore-eos", "--workload", "burst",
                "--result-dir", str(tmp_path), "--disable-tqdm"]
        for m in metrics:
            args += ["--metrics-url", m]
        [r] = main(args)
        assert r["failed"] == 0 and r["total_output_tokens"] == 32 * 64, r["errors"][:3]
        assert r["server_metrics"]["kv_transfer_gb"] > 0
        print({k: r[k] for k in ("request_throughput", "output_throughput", "mean_ttft_ms", "mean_tpot_ms")},
              {k: v for k, v in r["server_metrics"].items() if k.startswith("kv_transfer")})
    finally:
        subprocess.run([sys.executable, "-m", "glmserve.deploy", "down", "--state_dir", state], cwd=REPO, timeout=120)
