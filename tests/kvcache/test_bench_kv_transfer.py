"""bench/kv_transfer.py runs end to end on CPU (gloo): two processes, bytes checked, JSON written."""

import json

import pytest

from bench import kv_transfer

pytestmark = pytest.mark.timeout(120)


def test_kv_transfer_bench_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "kv.json"
    kv_transfer.main(["--device", "cpu", "--tokens", "16,100", "--num_layers", "2", "--entry_dim", "64",
                      "--reps", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["rows"]] == [16, 100]
    assert [r["pages"] for r in res["rows"]] == [1, 7]
    assert res["layout"]["page_bytes"] == 2 * 16 * 64 * 2
    for r in res["rows"]:
        assert r["bytes_equal"] and r["bytes"] == r["pages"] * res["layout"]["page_bytes"]
        assert r["link_gbps"] > 0 and r["plain_gpu_gbps"] > 0 and r["plain_host_ms"] > 0
        assert r["gather_ms"] > 0 and r["scatter_ms"] > 0
        # the link's time covers its own kernels (one host clock across both processes)
        assert r["link_ms"] > r["gather_ms"] and r["link_ms"] > r["scatter_ms"]
    assert "link ms" in capsys.readouterr().out
