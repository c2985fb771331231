"""The embedded default model (a tiny random GLM-4.7-Flash-shaped checkpoint + the built-in tokenizer) and presets.

A preset (`--preset glm-4.7-flash`) is a real model's config.json from deploy/model_configs/ with the
built-in tokenizer beside it, served with `--load-format dummy`: the real shapes with random weights,
for benchmarks where no checkpoint can be had (ids the tokenizer lacks detokenize to nothing).

Runs in the deploy CLI process before supervisord starts, once: the directory is written under a
temporary name and renamed into place, so a half-written model is never served and two
`deploy up` calls cannot interleave. Same seed -> the same bytes-for-bytes weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile

DEFAULT_SEED = 0
MARKER = "glmserve_default_model.txt"
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def preset_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".json"))


def write_preset(state_dir: str, name: str) -> str:
    """`<state_dir>/presets/<name>/` with the preset's config.json and the built-in tokenizer; returns it."""
    from glmserve.shared.tokenizer.builtin import write_builtin_tokenizer

    path = os.path.join(state_dir, "presets", name)
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(os.path.join(PRESET_DIR, name + ".json"), os.path.join(path, "config.json"))
    write_builtin_tokenizer(path)
    return path


def write_default_model(path: str, seed: int = DEFAULT_SEED) -> str:
    """Write the default model at `path` (must not exist) and return it."""
    from glmserve.shared.tokenizer.builtin import BUILTIN_EOS_IDS, BUILTIN_PAD_ID, BUILTIN_VOCAB_SIZE, write_builtin_tokenizer
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(path, "glm4_moe_lite", seed=seed, vocab_size=BUILTIN_VOCAB_SIZE,
                          eos_token_id=list(BUILTIN_EOS_IDS), pad_token_id=BUILTIN_PAD_ID,
                          max_position_embeddings=4096)
    write_builtin_tokenizer(path)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(f"tiny random glm4_moe_lite, seed {seed}, built-in tokenizer; written by python -m glmserve.deploy\n")
    return path


def ensure_default_model(state_dir: str, seed: int = DEFAULT_SEED) -> str:
    """`<state_dir>/default_model`, created on first use."""
    path = os.path.join(state_dir, "default_model")
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    os.makedirs(state_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".default_model.", dir=state_dir)
    try:
        write_default_model(os.path.join(tmp, "m"), seed)
        if os.path.exists(path):  # a stale, unmarked (half-written) dir from an older run
            shutil.rmtree(path)
        os.rename(os.path.join(tmp, "m"), path)
    except OSError:
        if not os.path.exists(os.path.join(path, MARKER)):
            raise
        # another `deploy up` won the race; its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
