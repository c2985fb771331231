"""Real prefill + decode worker processes (ZeroMQ, gloo KV link), the test playing the router.

- greedy tokens equal shared.generate's for both architectures, with prompts over several
  prefill chunks; the first token comes from the prefill exactly once, the rest from the decode;
- aborts at every stage (before prefill, during the handoff, while decoding) and Busy;
- pages of both workers return to zero after each test (read from their heartbeats and /metrics).
"""

from __future__ import annotations

import random
import time
import urllib.request

import pytest

from glmserve.shared import protocol as P
from tests.workers.harness import WorkerPair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def pair(request, tmp_path_factory):
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    model_dir = write_tiny_checkpoint(str(root / "model"), request.param, seed=0)
    wp = WorkerPair(model_dir, str(root), page_size=4, num_pages=64, chunked_prefill_size=16)
    wp.model_dir = model_dir
    try:
        wp.wait_ready()
        yield wp
    finally:
        wp.stop()


def _start(pair: WorkerPair, rid: str, prompt: list[int], sampling: P.SamplingParams) -> P.Msg:
    pair.send("d0", P.Reserve(rid=rid, prompt_ids=P.pack_ids(prompt), sampling=sampling, prefill_id="p0"))
    ans = pair.wait(lambda: pair.take(lambda m: getattr(m, "rid", None) == rid), 30, f"reserve {rid}")[0]
    if isinstance(ans, P.Reserved):
        pair.send("p0", P.PrefillRequest(rid=rid, prompt_ids=P.pack_ids(prompt), sampling=sampling,
                                         decode_id="d0", decode_page_ids=ans.page_ids,
                                         decode_link_epoch=ans.link_epoch))
    return ans


def _collect(pair: WorkerPair, rids: set[str], timeout_s: float = 60) -> dict[str, list[P.TokenEvent]]:
    events: dict[str, list[P.TokenEvent]] = {r: [] for r in rids}

    def done():
        for m in pair.take(lambda m: getattr(m, "rid", None) in rids):
            assert isinstance(m, P.TokenEvent), m
            events[m.rid].append(m)
        return all(ev and ev[-1].finished for ev in events.values())

    pair.wait(done, timeout_s, "requests finished")
    return events


def _pages_zero(pair: WorkerPair) -> None:
    pair.status.clear()  # only heartbeats sent after this point count
    pair.wait(lambda: len(pair.status) == 2 and not any(pair.used_pages().values()), 10, "pages back to zero")
    text = urllib.request.urlopen(f"http://127.0.0.1:{pair.health['d0']}/metrics", timeout=5).read().decode()
    assert 'glm_worker_page_leaks_total{role="decode",worker="d0"} 0.0' in text


def _metric(pair: WorkerPair, worker: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{pair.health[worker]}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_greedy_equals_single_process(pair):
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (3, 17, 40, 8)]
    ref = generate(ModelRunner(pair.model_dir), prompts, max_new_tokens=6, ignore_eos=True)
    sp = P.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    for i, p in enumerate(prompts):
        assert isinstance(_start(pair, f"g{i}", p, sp), P.Reserved)
    events = _collect(pair, {f"g{i}" for i in range(len(prompts))})
    for i, r in enumerate(ref):
        ev = events[f"g{i}"]
        assert ev[0].worker_id == "p0" and all(e.worker_id == "d0" for e in ev[1:])
        got = [t for e in ev for t in P.unpack_ids(e.token_ids)]
        assert got == r["token_ids"], f"prompt {i}"
        assert ev[-1].finish_reason == "length"
    # the decode sends a step's events in one frame (the four requests share steps)
    assert any(w == "d0" and n > 1 for w, n in pair.batched_frames), pair.batched_frames
    _pages_zero(pair)
    for w in ("p0", "d0"):  # both ends count the KV bytes (the heartbeat after the transfers)
        assert _metric(pair, w, "glm_worker_kv_transfer_bytes_total") > 0
        assert _metric(pair, w, "glm_worker_kv_transfer_gbps") > 0
    assert _metric(pair, "p0", "glm_worker_tokens_total") >= sum(len(p) for p in prompts)


def test_aborts_at_every_stage_free_all_pages(pair):
    sp = P.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    prompt = list(range(5, 45))  # 3 prefill chunks of 16
    _start(pair, "a_before", prompt, sp)
    pair.send("d0", P.Abort(rid="a_before"))
    pair.send("p0", P.Abort(rid="a_before"))
    _start(pair, "a_decoding", prompt, sp)
    pair.wait(lambda: [m for m in pair.inbox if getattr(m, "rid", "") == "a_decoding" and m.worker_id == "d0"],
              30, "decode tokens")
    pair.send("d0", P.Abort(rid="a_decoding"))
    pair.send("p0", P.Abort(rid="a_decoding"))
    _start(pair, "a_decode_only", prompt, sp)  # router aborts only the decode side mid-handoff
    pair.send("d0", P.Abort(rid="a_decode_only"))
    _start(pair, "ok", [7, 8, 9], P.SamplingParams(temperature=0.0, max_new_tokens=3))
    ev = _collect(pair, {"ok"})["ok"]
    assert sum(len(P.unpack_ids(e.token_ids)) for e in ev) <= 3 and ev[-1].finished
    _pages_zero(pair)
    pair.take(lambda m: True)


def test_busy_when_pages_short(pair):
    sp = P.SamplingParams(max_new_tokens=4)
    pair.send("d0", P.Reserve(rid="fill", prompt_ids=P.pack_ids([5] * 200), sampling=sp, prefill_id="p0"))
    assert isinstance(pair.wait(lambda: pair.take(lambda m: getattr(m, "rid", "") == "fill"), 30, "fill")[0], P.Reserved)
    ans = _start(pair, "more", [3 + i % 200 for i in range(80)], sp)  # 21 pages, 12 free
    assert isinstance(ans, P.Busy) and "pages" in ans.reason
    pair.send("d0", P.Abort(rid="fill"))
    ans = _start(pair, "never", [3 + i % 200 for i in range(4 * 70)], sp)  # more pages than the worker has
    assert isinstance(ans, P.RequestError) and "KV pages" in ans.message
    _pages_zero(pair)


def test_seeded_sampling_equals_single_process(pair):
    """The decode continues the prefill's seeded generator: same seed -> same tokens as one process."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    ref = generate(ModelRunner(pair.model_dir), [prompt], max_new_tokens=8, temperature=0.9, seed=1234,
                   ignore_eos=True)[0]["token_ids"]
    sp = P.SamplingParams(temperature=0.9, seed=1234, max_new_tokens=8, ignore_eos=True)
    got = []
    for k in range(2):  # twice: same seed, same output
        _start(pair, f"s{k}", prompt, sp)
        ev = _collect(pair, {f"s{k}"})[f"s{k}"]
        got.append([t for e in ev for t in P.unpack_ids(e.token_ids)])
    assert got[0] == got[1] == ref
    _pages_zero(pair)


def test_tp2_workers_greedy_equals_single_process(tmp_path):
    """--tp 2 on both workers: followers spawned by the leaders, plans fanned out over gloo, KV moved
    rank i -> rank i over two links; tokens equal the single-process reference. The decode pads
    batches of 1-2 to graph buckets on both ranks (3 run eagerly)."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe", seed=1)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=64, chunked_prefill_size=16, tp=2,
                    extra_decode=("--graph_max_batch_size", "2"))  # followers get the capture plan too
    try:
        wp.wait_ready(120)
        prompts = [[3 + (7 * i + j) % 240 for j in range(n)] for i, n in enumerate((5, 21, 34))]
        ref = generate(ModelRunner(model_dir), prompts, max_new_tokens=5, ignore_eos=True)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(wp, f"t{i}", p, sp), P.Reserved)
        events = _collect(wp, {f"t{i}" for i in range(3)})
        got = [[t for e in events[f"t{i}"] for t in P.unpack_ids(e.token_ids)] for i in range(3)]
        assert got == [r["token_ids"] for r in ref]
        _pages_zero(wp)
    finally:
        wp.stop()


def test_decode_killed_prefill_frees_and_relinks(tmp_path):
    """kill -9 of the decode while requests stream: the prefill notices the restarted decode's new
    generation, rebuilds its KV link, and the pair serves again with no page leaked on either side."""
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=2)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=256, chunked_prefill_size=16)
    try:
        wp.wait_ready(60)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True)
        for i in range(3):
            assert isinstance(_start(wp, f"k{i}", list(range(3, 40)), sp), P.Reserved)
        wp.wait(lambda: [m for m in wp.inbox if getattr(m, "worker_id", "") == "d0"], 30, "decode streaming")
        wp.kill_and_restart("d0")
        wp.wait_ready(60)
        _pages_zero(wp)
        assert isinstance(_start(wp, "after", [5, 6, 7], P.SamplingParams(max_new_tokens=3)), P.Reserved)
        ev = _collect(wp, {"after"})["after"]
        assert ev[-1].finished and sum(len(P.unpack_ids(e.token_ids)) for e in ev) == 3
        _pages_zero(wp)
    finally:
        wp.stop()


def test_idle_link_to_a_restarted_decode_is_rebuilt_at_the_next_request(tmp_path):
    """kill -9 of the decode while its link is idle: nothing on the prefill notices (no transfer
    fails, and --relink_check_s 600 keeps the periodic hello away). The next request is reserved
    on the restarted decode, whose Reserved carries its epoch floor, newer than the prefill's
    link: the prefill rebuilds the link before prefilling, holds the request meanwhile, then
    serves it (equal to the reference). Before, it prefilled onto the dead link: a first token
    reached the router and then the request failed."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe", seed=5)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=64, chunked_prefill_size=16,
                    extra_prefill=("--relink_check_s", "600"))
    try:
        wp.wait_ready(60)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
        prompt = [9, 8, 7, 6, 5]
        ref = generate(ModelRunner(model_dir), [prompt], max_new_tokens=3, ignore_eos=True)[0]["token_ids"]
        for rid in ("before", "again"):  # the second one: the fresh link is not rebuilt again
            assert isinstance(_start(wp, rid, prompt, sp), P.Reserved)
            ev = _collect(wp, {rid})[rid]
            assert [t for e in ev for t in P.unpack_ids(e.token_ids)] == ref
            if rid == "before":
                wp.kill_and_restart("d0")
                wp.wait_ready(60)
        _pages_zero(wp)
        log = open(wp.logs["p0"]).read()
        assert log.count(": rebuilding") == 1 and log.count("KV link to d0 up") == 2, log[-2000:]
    finally:
        wp.stop()


def test_push_on_an_old_link_epoch_is_dropped(pair):
    """A push announced for a link this decode has replaced (a message from before a restart or a
    rebuild) posts no recv: were it received, the recv would pair with the next real transfer
    (header mismatch, link torn down). The held request fails; the link keeps serving."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    sp = P.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    pair.send("d0", P.Reserve(rid="stale", prompt_ids=P.pack_ids([9] * 6), sampling=sp, prefill_id="p0"))
    res = pair.wait(lambda: pair.take(lambda m: getattr(m, "rid", "") == "stale"), 30, "reserve")[0]
    assert isinstance(res, P.Reserved)
    pair.send("d0", P.KVChunkReady(rid="stale", prefill_id="p0", page_ids=res.page_ids, num_tokens=6, is_last=True,
                                   has_hidden=True, link_epoch=1))  # never a live epoch
    err = pair.wait(lambda: pair.take(lambda m: getattr(m, "rid", "") == "stale"), 30, "stale push refused")[0]
    assert isinstance(err, P.RequestError) and "rebuilt" in err.message
    prompt = [21, 22, 23, 24, 25, 26, 27]
    ref = generate(ModelRunner(pair.model_dir), [prompt], max_new_tokens=4, ignore_eos=True)[0]["token_ids"]
    _start(pair, "fresh", prompt, sp)
    ev = _collect(pair, {"fresh"})["fresh"]
    assert [t for e in ev for t in P.unpack_ids(e.token_ids)] == ref
    _pages_zero(pair)


def test_pushes_complete_while_the_prefill_blocks_before_sampling(tmp_path, monkeypatch):
    """The ordering rule behind the GPU handoff hang: the prefill must never need its sends to
    complete before it has announced them. GLM_PREFILL_SYNC_SENDS=1 makes the prefill block,
    after each step's announces and before sampling, until the step's sends completed (what a
    device-wide sync does to a spinning NCCL send). Announced after sampling, every handoff
    would time out here; announced first, the pair serves and equals the reference."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    monkeypatch.setenv("GLM_PREFILL_SYNC_SENDS", "1")
    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe_lite", seed=4)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=64, chunked_prefill_size=8)
    try:
        wp.wait_ready(60)
        prompts = [[3 + (5 * i + j) % 200 for j in range(n)] for i, n in enumerate((6, 19))]
        ref = generate(ModelRunner(model_dir), prompts, max_new_tokens=4, ignore_eos=True)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        for i, p in enumerate(prompts):
            assert isinstance(_start(wp, f"y{i}", p, sp), P.Reserved)
        events = _collect(wp, {"y0", "y1"}, timeout_s=60)
        assert [[t for e in events[f"y{i}"] for t in P.unpack_ids(e.token_ids)] for i in range(2)] == \
            [r["token_ids"] for r in ref]
        _pages_zero(wp)
    finally:
        wp.stop()


def test_first_token_only_counted_once_and_logprobs(pair):
    """max_new_tokens=1: the prefill's token ends the request; the decode sends nothing for it.
    logprobs ride on the events (one per token, top-k pairs when asked) and match shared.generate."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    prompt = [21, 22, 23, 24, 25, 26]
    _start(pair, "one", prompt, P.SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True))
    ev = _collect(pair, {"one"})["one"]
    assert len(ev) == 1 and ev[0].worker_id == "p0" and ev[0].finished and ev[0].finish_reason == "length"
    ref = generate(ModelRunner(pair.model_dir), [prompt], max_new_tokens=4, ignore_eos=True)[0]
    sp = P.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2)
    _start(pair, "lp", prompt, sp)
    ev = _collect(pair, {"lp"})["lp"]
    lps = [x for e in ev for x in e.logprobs]
    tops = [t for e in ev for t in e.top_logprobs]
    assert [t for e in ev for t in P.unpack_ids(e.token_ids)] == ref["token_ids"]
    assert lps == pytest.approx(ref["logprobs"], abs=1e-4)
    assert len(tops) == 4 and all(len(t) == 2 and t[0][0] == tok for t, tok in zip(tops, ref["token_ids"]))
    pair.wait(lambda: True, 0.3, "no stray events")
    assert not [m for m in pair.inbox if getattr(m, "rid", "") == "one"]
    _pages_zero(pair)


def test_bad_requests_get_errors_not_crashes(pair):
    sp = P.SamplingParams(max_new_tokens=2)
    ans = _start(pair, "oov", [5, 6, 100000], sp)
    assert isinstance(ans, P.RequestError) and "out of range" in ans.message
    ans = _start(pair, "empty", [], sp)
    assert isinstance(ans, P.RequestError) and "empty" in ans.message
    _start(pair, "fine", [5, 6], sp)
    assert _collect(pair, {"fine"})["fine"][-1].finished  # still serving
    _pages_zero(pair)


def test_prefill_not_ready_without_a_decode(tmp_path):
    """/healthz answers while /readyz says why the prefill cannot take work (no KV link)."""
    import subprocess
    import sys
    import time
    import urllib.error

    from glmserve.shared.weights.tiny import write_tiny_checkpoint
    from glmserve.shared.worker_common.tp import free_port

    model_dir = write_tiny_checkpoint(str(tmp_path / "m"), "glm4_moe_lite", seed=0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmserve.prefill_worker", "--worker_id", "p0", "--model_dir", model_dir,
                             "--control_addr", f"tcp://127.0.0.1:{free_port()}",
                             "--router_addr", f"tcp://127.0.0.1:{free_port()}",
                             "--decode", f"d0=tcp://127.0.0.1:{free_port()}", "--health_port", str(port),
                             "--page_size", "4", "--num_pages", "16"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        time.sleep(1.0)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        assert e.value.code == 503 and b"no KV link" in e.value.read()
    finally:
        proc.terminate()
        proc.wait(10)


def test_prefill_killed_mid_handoff_decode_frees_and_relinks(tmp_path):
    """kill -9 of the prefill while long prompts are being pushed: once the router's aborts arrive the
    decode frees every reserved page (recvs in flight end first), relinks to the restarted prefill,
    and the pair serves again."""
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(str(tmp_path / "model"), "glm4_moe", seed=2)
    wp = WorkerPair(model_dir, str(tmp_path), page_size=4, num_pages=512, chunked_prefill_size=8)
    try:
        wp.wait_ready(60)
        sp = P.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
        rids = [f"long{i}" for i in range(4)]
        for rid in rids:
            assert isinstance(_start(wp, rid, [3 + i % 200 for i in range(400)], sp), P.Reserved)
        wp.kill_and_restart("p0")
        for rid in rids:  # what the router does when the prefill's heartbeats stop
            wp.send("d0", P.Abort(rid=rid, reason="prefill died"))
        wp.wait_ready(60)
        _pages_zero(wp)
        assert isinstance(_start(wp, "after", [5, 6, 7], P.SamplingParams(max_new_tokens=3)), P.Reserved)
        assert _collect(wp, {"after"})["after"][-1].finished
        _pages_zero(wp)
    finally:
        wp.stop()
