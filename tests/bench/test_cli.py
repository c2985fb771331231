"""The whole tool against the timed server: every workload, a sweep, JSON fields, PNG files, /metrics figures."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from bench.sharegpt.cli import main

JSON_FIELDS = {
    "date", "backend", "base_url", "endpoint", "model_id", "dataset", "synthetic", "dataset_note", "workload",
    "num_prompts", "seed", "request_rate", "burstiness", "max_concurrency", "ignore_eos", "token_counter",
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "max_inflight_requests", "input_lens", "output_lens", "ttfts", "itls", "e2els", "start_times",
    "generated_texts", "errors", "server_metrics",
} | {f"{s}_{k}_ms" for s in ("mean", "median", "std", "p90", "p99") for k in ("ttft", "tpot", "itl", "e2el")}


def png_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature, IHDR CRC and IEND trailer."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", data[16:24])


def _run(url, tmp_path, *extra):
    return main(["--base-url", url, "--dataset", "random", "--random-input-len", "8",
                 "--random-output-len", "4", "--num-prompts", "6", "--ignore-eos", "--disable-tqdm",
                 "--result-dir", str(tmp_path), "--metrics-settle-s", "0.05", *extra])


def test_every_workload(timed_server, tmp_path, capsys):
    results = _run(timed_server, tmp_path, "--workload", "all", "--goodput", "ttft:1000", "tpot:500")
    assert [r["workload"] for r in results] == ["burst", "high-conc", "moderate", "steady"]
    assert [r["max_concurrency"] for r in results] == [None, 512, None, None]
    assert [r["request_rate"] for r in results] == ["inf", "inf", 10.0, 5.0]
    for r in results:
        assert JSON_FIELDS <= set(r), JSON_FIELDS - set(r)
        assert (r["completed"], r["failed"], r["total_output_tokens"], r["total_input_tokens"]) == (6, 0, 24, 48)
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])
        assert r["model_id"] == "timed-model" and r["synthetic"] is False
        srv = r["server_metrics"]
        assert srv["kv_transfer_gb_per_s_while_sending"] == pytest.approx(4.0)  # 2 GB per 0.5 s per request
        assert srv["mtp_acceptance_rate"] == pytest.approx(0.5)
        assert srv["kv_pages_used"] == 12 and srv["queue_depths"] == {"glm_prefill_queue_tokens": 3.0}
        assert srv["kv_pages_used_peak"] == 12
        stem = os.path.join(tmp_path, f"random-{r['workload']}")
        assert json.load(open(stem + ".json"))["completed"] == 6
        assert png_size(stem + ".png") == (800, 560)
    # moderate is Poisson at 10 req/s: no request leaves before its arrival time
    from bench.sharegpt.load import WORKLOADS, arrival_offsets

    offsets = arrival_offsets(6, WORKLOADS["moderate"], seed=0)
    assert offsets[-1] > 0.1 and all(t >= at for t, at in zip(results[2]["start_times"], offsets))
    table = capsys.readouterr().out
    assert "=========== Serving Benchmark Result ============" in table
    for row in ("Successful requests:", "Request goodput (req/s):", "Peak concurrent requests:",
                "P99 TTFT (ms):", "Median TPOT (ms):", "P90 ITL (ms):", "Mean E2EL (ms):"):
        assert row in table


def test_synthetic_sharegpt_is_labelled(timed_server, tmp_path, capsys):
    [r] = _run(timed_server, tmp_path, "--dataset", "sharegpt", "--sharegpt-output-len", "3",
               "--endpoint", "/v1/chat/completions", "--max-concurrency", "3", "--no-plots")
    assert r["synthetic"] is True and "synthetic" in r["dataset_note"]
    assert r["total_output_tokens"] == 18 and r["max_inflight_requests"] == 3
    assert "synthetic" in capsys.readouterr().out.lower()


def test_concurrency_sweep_script(timed_server, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "bench", "run_sharegpt.py"), "--base-url", timed_server,
           "--dataset", "prefix", "--prefix-len", "8", "--random-input-len", "4", "--random-output-len", "3",
           "--num-prompts", "4", "--sweep", "concurrency", "--sweep-values", "1,4", "--result-dir", str(tmp_path),
           "--result-filename", "sw"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sweep = json.load(open(tmp_path / "sw_sweep.json"))
    assert [s["max_concurrency"] for s in sweep] == [1, 4]
    # concurrency 1 serializes the 4 requests; the cap of 4 lets them overlap
    assert sweep[0]["max_inflight_requests"] == 1 and 1 <= sweep[1]["max_inflight_requests"] <= 4
    assert sweep[0]["duration"] >= 4 * 0.05  # 4 requests one after the other, each >= the server's first-token wait
    assert png_size(str(tmp_path / "sw_sweep.png")) == (880, 360)


def test_rate_sweep(timed_server, tmp_path):
    results = _run(timed_server, tmp_path, "--sweep", "rate", "--sweep-values", "20,inf", "--result-filename", "rs")
    assert [r["request_rate"] for r in results] == [20.0, "inf"]
    assert [r["workload"] for r in results] == ["rate-20", "rate-inf"]
    from bench.sharegpt.load import LoadShape, arrival_offsets

    offsets = arrival_offsets(6, LoadShape(20.0), seed=0)  # the schedule the run followed
    assert offsets[-1] > 0.05
    assert all(t >= at for t, at in zip(results[0]["start_times"], offsets))  # nothing sent early
    sweep = json.load(open(tmp_path / "rs_sweep.json"))
    assert [s["request_rate"] for s in sweep] == [20.0, "inf"] and "ttfts" not in sweep[0]
    assert png_size(str(tmp_path / "rs_sweep.png")) == (880, 360)
