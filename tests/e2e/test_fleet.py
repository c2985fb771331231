"""The real fleet on CPU (router + prefill + decode processes, ZeroMQ, gloo KV link, openai client).

- greedy tokens equal shared.generate's for the same model and prompts, token for token, for both
  architectures (proves the KV handoff and the first-token path), with prompts spanning several
  prefill chunks (chunked_prefill_size 32, page size 4);
- 32 concurrent requests of mixed lengths all complete with the requested token counts;
- every worker's KV pages return to zero used after each test.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import time

import pytest

from .fleet import start_fleet

pytestmark = pytest.mark.slow

PROMPT_LENS = [3, 17, 40, 71]  # 71 tokens = 3 chunks of 32 (several prefill chunks)


@pytest.fixture(scope="module", params=[("glm4_moe", "auto"), ("glm4_moe_lite", "auto"), ("glm4_moe_lite", "ipc")],
                ids=["glm4_moe", "glm4_moe_lite", "glm4_moe_lite-ipc"])
def arch_fleet(request, tiny_model_dirs, tmp_path_factory):
    """auto on CPU = the gloo link; ipc = the same-host link (the decode copies from the prefill's
    shared-memory cache: what one GPU runs, there through CUDA IPC)."""
    arch, transport = request.param
    f = start_fleet(tiny_model_dirs[arch], str(tmp_path_factory.mktemp("logs")), chunked_prefill_size=32,
                    worker_args=("--kv_transport", transport))
    want = "IPCLink" if transport == "ipc" else "PGLink"
    assert f"KV link to p0 over {want}" in open(f.logs["d0"]).read()
    yield f
    f.stop()


def _client(fleet):
    from openai import OpenAI

    return OpenAI(base_url=fleet.base_url + "/v1", api_key="x", timeout=60, max_retries=0)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _complete_ids(client, prompt: list[int], max_tokens: int) -> list[int]:
    r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=max_tokens,
                                  temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(r.choices[0].model_extra.get("token_ids") or r.choices[0].token_ids)


def _pages_back_to_zero(fleet, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = {w: fleet.metric(w, "glm_worker_kv_pages_used") for w in fleet.health_ports}
        if not any(used.values()):
            return
        time.sleep(0.25)
    raise AssertionError(f"KV pages still used after the test: {used}")


def test_greedy_equals_single_process(arch_fleet):
    from glmserve.shared.config.model import ModelConfig
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    vocab = ModelConfig.from_dir(arch_fleet.model_dir).vocab_size
    prompts = _prompts(vocab)
    ref = generate(ModelRunner(arch_fleet.model_dir), prompts, max_new_tokens=8, ignore_eos=True)
    client = _client(arch_fleet)
    got = [_complete_ids(client, p, 8) for p in prompts]
    assert got == [r["token_ids"] for r in ref]
    _pages_back_to_zero(arch_fleet)


def test_32_concurrent_mixed_lengths(arch_fleet):
    vocab_hi = 200
    rng = random.Random(1)
    jobs = [([rng.randrange(3, vocab_hi) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 12)) for _ in range(32)]
    client = _client(arch_fleet)
    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda j: _complete_ids(client, j[0], j[1]), jobs))
    assert [len(o) for o in outs] == [n for _, n in jobs]
    _pages_back_to_zero(arch_fleet)
