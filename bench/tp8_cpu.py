"""Issue 9 on CPU: TP-8 / TP-4+TP-4 over gloo against the TP=1 single-process greedy output (a script, not CI).

    OMP_NUM_THREADS=1 python bench/tp8_cpu.py [--new_tokens 24] [--num_prompts 8] [--out DIR]

For each architecture (tiny checkpoints whose TP-sharded sizes divide by 8, tests/tp8/tp8_models.py):
(1) `python -m glmserve.shared.generate --tp 8` (one 8-rank gloo group) vs TP=1; (2) the real fleet, router + a
TP-4 prefill worker + a TP-4 decode worker (8 worker processes, KV over 4 gloo links), all prompts sent
at once with the openai client, vs TP=1. Prints one JSON line per run and a summary table; exits 1 on
any mismatch. Runs in the operator's shell; CI runs the smaller tests/tp8/test_tp8_cpu.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.e2e.fleet import start_fleet  # noqa: E402
from tests.tp8.tp8_models import ARCHS, reference_outputs, write_tp8_model  # noqa: E402


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)  # lengths 3..60: several pages (4) and prefill chunks (16)
    return [[rng.randrange(3, 980) for _ in range(rng.randint(3, 60))] for _ in range(n)]


def run_generate_tp(model_dir: str, prompts: list[list[int]], new_tokens: int, tp: int) -> tuple[list, float]:
    cmd = [sys.executable, "-m", "glmserve.shared.generate", "--model_dir", model_dir, "--prompt_ids_json",
           json.dumps(prompts), "--max_new_tokens", str(new_tokens), "--ignore_eos", "--tp", str(tp)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    outs = json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]
    return [o["token_ids"] for o in outs], time.monotonic() - t0


def run_fleet(model_dir: str, prompts: list[list[int]], new_tokens: int, log_dir: str) -> dict:
    from openai import OpenAI

    t0 = time.monotonic()
    fleet = start_fleet(model_dir, log_dir, num_pages=512, chunked_prefill_size=16, timeout_s=300,
                        worker_args=("--tp", "4"))
    ready_s = time.monotonic() - t0
    client = OpenAI(base_url=fleet.base_url + "/v1", api_key="x", timeout=300, max_retries=0)

    def one(p: list[int]) -> list[int]:
        r = client.completions.create(model="x", prompt=p, max_tokens=new_tokens, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return list(r.choices[0].model_extra["token_ids"])

    try:
        t1 = time.monotonic()
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(one, prompts))
        serve_s = time.monotonic() - t1
        time.sleep(1.0)
        used = {w: fleet.metric(w, "glm_worker_kv_pages_used") for w in fleet.health_ports}
    finally:
        fleet.stop()
    return {"tokens": got, "ready_s": ready_s, "serve_s": serve_s, "pages_used_after": used}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--out", default="")
    a = p.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="tp8_cpu_")
    prompts = _prompts(a.num_prompts)
    ok = True
    for arch in ARCHS:
        model_dir = write_tp8_model(os.path.join(root, arch), arch)
        t0 = time.monotonic()
        want = reference_outputs(model_dir, prompts, a.new_tokens)
        ref_s = time.monotonic() - t0
        tp8, tp8_s = run_generate_tp(model_dir, prompts, a.new_tokens, 8)
        os.makedirs(os.path.join(root, f"{arch}_logs"), exist_ok=True)
        fl = run_fleet(model_dir, prompts, a.new_tokens, os.path.join(root, f"{arch}_logs"))
        row = {"arch": arch, "prompts": len(prompts), "new_tokens": a.new_tokens, "tp1_s": round(ref_s, 1),
               "tp8_generate_equal": tp8 == want, "tp8_generate_s": round(tp8_s, 1),
               "fleet_tp4x2_equal": fl["tokens"] == want, "fleet_ready_s": round(fl["ready_s"], 1),
               "fleet_serve_s": round(fl["serve_s"], 1), "fleet_pages_used_after": fl["pages_used_after"]}
        ok &= row["tp8_generate_equal"] and row["fleet_tp4x2_equal"] and not any(fl["pages_used_after"].values())
        print(json.dumps(row), flush=True)
    print("ALL EQUAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
