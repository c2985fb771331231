"""Every workload of the load test, briefly, against the real CPU demo fleet (deploy up; router + 2 workers)."""

import pytest

from bench.sharegpt.cli import main

pytestmark = pytest.mark.slow


def test_every_workload_on_the_fleet(cpu_fleet, tmp_path, capsys):
    url, metrics = cpu_fleet
    args = ["--base-url", url, "--dataset", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len", "4",
            "--sharegpt-max-prompt-len", "64", "--ignore-eos", "--workload", "all", "--disable-tqdm",
            "--result-dir", str(tmp_path), "--no-plots"]
    for m in metrics:
        args += ["--metrics-url", m]
    results = main(args)
    assert [r["workload"] for r in results] == ["burst", "high-conc", "moderate", "steady"]
    for r in results:
        assert r["failed"] == 0, r["errors"]
        assert r["completed"] == 4 and r["total_output_tokens"] == 16  # ignore_eos: exactly max_tokens
        assert r["synthetic"] is True
        assert r["mean_ttft_ms"] > 0 and r["mean_tpot_ms"] > 0
        srv = r["server_metrics"]
        assert srv.get("kv_transfer_gb", 0) > 0, srv  # the prompts' KV moved prefill -> decode
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_datasets_and_endpoints_on_the_fleet(cpu_fleet, tmp_path):
    url, _ = cpu_fleet
    for dataset, endpoint in (("random", "/v1/completions"), ("prefix", "/v1/chat/completions"),
                              ("random", "/generate"), ("random", "/generate_stream")):
        [r] = main(["--base-url", url, "--dataset", dataset, "--random-input-len", "16", "--random-output-len", "3",
                    "--prefix-len", "16", "--num-prompts", "3", "--ignore-eos", "--endpoint", endpoint,
                    "--max-concurrency", "2", "--disable-tqdm", "--result-dir", str(tmp_path), "--no-plots",
                    "--no-server-metrics"])
        assert r["completed"] == 3 and r["failed"] == 0, r["errors"]
        assert r["total_output_tokens"] == 9
