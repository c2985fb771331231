"""Tiny checkpoints whose every TP-sharded size divides by 8 (issue 9 on CPU), and the fixed prompts.

Used by tests/tp8 (pytest process) and bench/tp8_cpu.py. Head counts, kv heads, the dense and the
expert intermediate sizes and the vocab (the built-in tokenizer's 1024) all divide by 8, so TP-8 splits
every parallel layer without kv-head replication or vocab padding.
"""

from __future__ import annotations

import os

TP8_SHAPE = dict(num_attention_heads=8, num_key_value_heads=8, hidden_size=128, intermediate_size=128,
                 moe_intermediate_size=32)  # per rank at TP-8: 1 head, 16 / 4 intermediate columns
ARCHS = ("glm4_moe", "glm4_moe_lite")
# token ids of the built-in tokenizer (vocab 1024, ids 988/995/997 are EOS; ignore_eos is set anyway)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22],
           [100, 200, 300, 400, 500, 600, 700, 800, 900, 101, 11, 12, 13, 14, 15, 16, 17, 18, 19, 40, 41, 42]]


def write_tp8_model(path: str, arch: str, seed: int = 5) -> str:
    """Write (once) a tiny `arch` checkpoint with the built-in tokenizer at `path`; return `path`."""
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    head = {"head_dim": 16} if arch == "glm4_moe" else {}  # lite: MLA dims keep their tiny defaults
    return write_tiny_checkpoint(path, arch, seed=seed, with_tokenizer=True, **TP8_SHAPE, **head)


def reference_outputs(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy token ids of the TP=1 single-process reference (shared.generate), ignore_eos."""
    from glmserve.shared.generate import generate
    from glmserve.shared.runner.model_runner import ModelRunner

    runner = ModelRunner(model_dir, with_mtp=False)
    return [o["token_ids"] for o in generate(runner, prompts, max_new_tokens, ignore_eos=True)]
