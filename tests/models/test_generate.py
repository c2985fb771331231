"""`python -m glmserve.shared.generate` (a real subprocess): greedy output equals transformers' greedy generate,
logprobs are the log-softmax of the chosen tokens, --tp 2 (gloo) gives the same tokens, and a seeded
temperature run is reproducible."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPTS = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _generate(model_dir, *extra):
    cmd = [sys.executable, "-m", "glmserve.shared.generate", "--model_dir", model_dir, "--prompt_ids_json",
           json.dumps(PROMPTS), "--max-new-tokens", "8", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["outputs"]


@pytest.mark.slow
def test_generate_matches_transformers_and_tp2(tiny_dirs):
    model_dir = tiny_dirs["glm4_moe"]
    outs = _generate(model_dir, "--ignore_eos")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                          output_logits=True, return_dict_in_generate=True)
        assert out["token_ids"] == ref.sequences[0, len(prompt):].tolist()
        want_lp = [float(s[0].log_softmax(-1)[t]) for s, t in zip(ref.logits, out["token_ids"])]
        assert max(abs(a - b) for a, b in zip(out["logprobs"], want_lp)) < 1e-4
    assert [o["token_ids"] for o in _generate(model_dir, "--ignore_eos", "--tp", "2")] == [o["token_ids"] for o in outs]


def test_generate_stops_at_eos_and_seeded_sampling(tiny_dirs):
    model_dir = tiny_dirs["glm4_moe_lite"]
    greedy = _generate(model_dir, "--ignore_eos")
    eos = greedy[0]["token_ids"][2]
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    runner = ModelRunner(model_dir, with_mtp=False)
    object.__setattr__(runner.config, "eos_token_ids", (eos,))
    stopped = generate(runner, PROMPTS, 8)
    first_eos = greedy[0]["token_ids"].index(eos)
    assert stopped[0]["token_ids"] == greedy[0]["token_ids"][: first_eos + 1]
    a = _generate(model_dir, "--ignore_eos", "--temperature", "1.0", "--seed", "7")
    b = _generate(model_dir, "--ignore_eos", "--temperature", "1.0", "--seed", "7")
    assert a == b and a != greedy
