"""worker_common: protocol round trip, CLI flags, step plans -> ForwardBatch, health/metrics HTTP,
and the TP fan-out over a real 2-process gloo group."""

import multiprocessing as mp
import urllib.error
import urllib.request

import pytest

from glmserve.shared import protocol as P
from glmserve.shared.worker_common.config import common_parser, parse_peers, worker_config
from glmserve.shared.worker_common.health import HealthServer
from glmserve.shared.worker_common.metrics import WorkerMetrics
from glmserve.shared.worker_common.plan import StepPlan, LinkOp, decode_plan, encode_plan, seq_plan, to_batch
from glmserve.shared.worker_common.tp import TPFanout, free_port, strip_tp_flags


def test_protocol_roundtrip_new_messages():
    for msg in [P.LinkHello(prefill_id="p0", reply_addr="tcp://127.0.0.1:1", generation=7),
                P.LinkInfo(decode_id="d0", link_host="h", link_port=5, generation=3),
                P.KVChunkReady(rid="r", prefill_id="p0", page_ids=P.pack_ids([1, 2]), num_tokens=9,
                               chunk_index=2, aborted=True, link_epoch=11),
                P.FirstToken(rid="r", prefill_id="p0", token_id=5, finished=True),
                P.TokenEvents(events=[P.TokenEvent(rid="a", worker_id="d0", token_ids=P.pack_ids([3])),
                                      P.TokenEvent(rid="b", worker_id="d0", token_ids=P.pack_ids([4, 5]),
                                                   finished=True, finish_reason="length")])]:
        assert P.decode(P.encode(msg)) == msg
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(P.Abort(rid="x", version=99)))
    with pytest.raises(P.ProtocolError):  # a frame holds 1 .. MAX_BATCHED_EVENTS events
        P.decode(P.encode(P.TokenEvents(events=[])))
    ev = P.TokenEvent(rid="a", worker_id="d0", token_ids=b"")
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(P.TokenEvents(events=[ev] * (P.MAX_BATCHED_EVENTS + 1))))


def test_cli_accepts_dashes_and_underscores():
    p = common_parser("prefill")
    a = p.parse_args(["--model-dir", "/m", "--control_addr", "tcp://127.0.0.1:1", "--router-addr", "tcp://127.0.0.1:2",
                      "--num-pages", "7", "--page_size", "4", "--tp", "2", "--gpus", "0,1", "--device", "cuda"])
    cfg = worker_config("prefill", a)
    assert (cfg.model_dir, cfg.num_pages, cfg.page_size, cfg.tp_size, cfg.gpus) == ("/m", 7, 4, 2, (0, 1))
    assert cfg.device_for_rank(1) == "cuda:1"
    assert cfg.fuse_shared_experts  # the default
    assert not worker_config("prefill", p.parse_args(["--model-dir", "/m", "--control_addr", "tcp://127.0.0.1:1",
                                                      "--router-addr", "tcp://127.0.0.1:2",
                                                      "--disable-shared-experts-fusion"])).fuse_shared_experts
    assert parse_peers(["d0=tcp://127.0.0.1:5611"]) == {"d0": "tcp://127.0.0.1:5611"}
    with pytest.raises(ValueError):
        parse_peers(["d0:5611"])
    assert strip_tp_flags(["--tp", "2", "--tp_rank", "1", "--tp-store-port=5", "--x"]) == ["--tp", "2", "--x"]
    base = ["--model-dir", "/m", "--control_addr", "tcp://127.0.0.1:1", "--router-addr", "tcp://127.0.0.1:2"]
    assert worker_config("decode", p.parse_args(base)).gpu_memory_utilization == 0.0  # off: --num_pages
    for flag in ("--gpu-memory-utilization", "--mem-fraction-static", "--mem_fraction_static"):
        assert worker_config("decode", p.parse_args([*base, flag, "0.45"])).gpu_memory_utilization == 0.45


def test_kv_pages_for_budget():
    """fraction * total - weights held - the activation/context reserve, in whole pages; too little is a
    ValueError naming the numbers, never a cache of 0 or 1 pages."""
    from glmserve.shared.worker_common.kv_budget import GiB, kv_pages_for_budget

    page = 866 * 1024  # GLM-4.7-Flash: 47 layers x 16 tokens x 576 bf16
    # one GPU of 80 GiB shared by prefill and decode, FP8 Flash (~29 GiB of weights) in each: 0.45 each
    pages = kv_pages_for_budget(80 * GiB, 29 * GiB, page, 0.45, reserve=4 * GiB)
    assert pages == int((0.45 * 80 - 29 - 4) * GiB) // page == 3632
    assert kv_pages_for_budget(80 * GiB, 29 * GiB, page, 0.9, reserve=4 * GiB) == (int(0.9 * 80 * GiB) - 33 * GiB) // page
    with pytest.raises(ValueError, match="raise the fraction"):
        kv_pages_for_budget(80 * GiB, 35 * GiB, page, 0.45, reserve=4 * GiB)  # the weights alone exceed the share
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="expected 0 < fraction <= 1"):
            kv_pages_for_budget(80 * GiB, 0, page, bad)


def test_plan_roundtrip_and_batch():
    plan = StepPlan(mode="prefill", seqs=[seq_plan([5, 6, 7], 0, [3, 4], want_logits=False),
                                          seq_plan([8, 9], 4, [1, 2], want_logits=True)],
                    link_ops=[LinkOp("send", "d0", "r/0", P.pack_ids([3]), hidden_row=2)])
    back = decode_plan(encode_plan(plan))
    assert back == plan
    b = to_batch(back, page_size=4, device="cpu")
    b.validate(4)
    assert b.logits_indices.tolist() == [4]  # only the second sequence's last token
    assert b.positions.tolist() == [0, 1, 2, 4, 5] and b.slot_mapping.tolist() == [12, 13, 14, 8, 9]


def test_health_server_ready_and_metrics():
    m = WorkerMetrics("p9", "prefill")
    state = {"ok": False}
    srv = HealthServer(0, lambda: (state["ok"], "loading weights"), m.render).start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        assert urllib.request.urlopen(base + "/healthz").status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/readyz")
        assert e.value.code == 503 and b"loading weights" in e.value.read()
        state["ok"] = True
        assert urllib.request.urlopen(base + "/readyz").status == 200
        m.kv_transfer(2_000_000_000, 1.0)
        m.handoff_failure("timeout")
        m.pages(3, 5)
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'glm_worker_kv_transfer_gbps{role="prefill",worker="p9"} 2.0' in text
        assert 'glm_worker_handoff_failures_total{reason="timeout",role="prefill",worker="p9"} 1.0' in text
        assert 'glm_worker_kv_pages_free{role="prefill",worker="p9"} 5.0' in text
    finally:
        srv.stop()


def _follower(port, q):
    f = TPFanout(1, 2, port, "cpu", timeout_s=30)
    got = [f.share(None) for _ in range(2)]
    q.put([decode_plan(g).mode for g in got])
    f.close()


def test_tp_fanout_broadcasts_plans_over_gloo():
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_follower, args=(port, q))
    p.start()
    lead = TPFanout(0, 2, port, "cpu", timeout_s=30)
    for mode in ("prefill", "decode"):
        assert lead.share(encode_plan(StepPlan(mode=mode, seqs=[seq_plan(list(range(300)), 0, [1] * 20)])))
    assert q.get(timeout=30) == ["prefill", "decode"]
    p.join(30)
    lead.close()
    assert p.exitcode == 0
