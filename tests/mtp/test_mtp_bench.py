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
        mean, low = row["experts_touched"].replace("(min", "").rstrip(")").split()  # e.g. "3.5 (min 3)"
        assert 1 <= int(low) <= float(mean), row["experts_touched"]  # counted by an eager forward, not a graph
        for k in (1, 2):
            c = row[f"k{k}"]
            assert c["verify_s"] > 0 and c["draft_s"] > 0
            p = c["projected_tok_s"]  # more acceptance, more projected tokens per step
            assert p["0.5"] < p["0.7"] < p["0.9"]
    assert 0.0 <= r["acceptance_random_weights"]["first_draft_acceptance"] <= 1.0
    out = capsys.readouterr().out
    assert "projected" in out and "experts/layer" in out


def test_experts_touched_refuses_a_forward_that_counted_nothing(tmp_path):
    """bench.profile_step.experts_touched_by: the experts an eager forward routes to; a run that counts none (a
    CUDA graph captured before tracking replays without counting) raises instead of reporting zero experts."""
    from bench.profile_step import experts_touched_by, touched_summary
    from glmserve.shared.kvcache.cache import PagedKVCache
    from glmserve.shared.runner.batch import ForwardBatch, ForwardMode
    from glmserve.shared.runner.model_runner import ModelRunner

    d = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe", seed=0)
    runner = ModelRunner(d, device="cpu", dtype="float32", with_mtp=False)
    kv = PagedKVCache(runner.kv_layout(16), 8, runner.device)
    batch = ForwardBatch.build(ForwardMode.PREFILL, [(list(range(3, 40)), 0, [1, 2, 3])], 16, device="cpu")
    touched = experts_touched_by(runner, lambda: runner.forward(batch, kv))
    assert sorted(touched) == runner.moe_layer_indices()
    assert all(1 <= n <= runner.config.n_routed_experts for n in touched.values())
    assert touched_summary({1: 3, 2: 5}) == "4.0 (min 3)"
    with pytest.raises(RuntimeError, match="replayed a CUDA graph"):
        experts_touched_by(runner, lambda: None)
