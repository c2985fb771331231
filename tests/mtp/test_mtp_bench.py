"""bench/mtp_step.py runs end to end on CPU at a tiny config (the GPU run uses the real Flash config)."""

from __future__ import annotations

import json

import pytest

from bench import mtp_step
from glmserve.shared.weights.tiny import write_tiny_checkpoint


@pytest.mark.parametrize("graphs", [False, True])  # True on CPU: the padded graph path, run eagerly
def test_mtp_step_bench_smoke(tmp_path, capsys, graphs):
    d = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=0)
    out = tmp_path / "r.json"
    mtp_step.main(["--config", f"{d}/config.json", "--device", "cpu", "--dtype", "float32", "--ctx", "8",
                   "--batches", "1,3", "--ks", "1,2", "--iters", "1", "--acc_prompt_len", "12", "--out", str(out),
                   *(["--graphs"] if graphs else [])])
    r = json.loads(out.read_text())
    assert r["graphs"] == graphs and all(row["graphs"] == graphs for row in r["rows"])
    assert [row["batch"] for row in r["rows"]] == [1, 3]
    for row in r["rows"]:
        for k in (1, 2):
            c = row[f"k{k}"]
            assert c["verify_s"] > 0 and c["draft_s"] > 0
            p = c["projected_tok_s"]  # more acceptance, more projected tokens per step
            assert p["0.5"] < p["0.7"] < p["0.9"]
    assert 0.0 <= r["acceptance_random_weights"]["first_draft_acceptance"] <= 1.0
    assert "projected" in capsys.readouterr().out
