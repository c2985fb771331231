"""Fixtures that start the real fleet on CPU (see tests/e2e/fleet.py); reused by router/bench tests.

`tiny_model_dir(arch)` writes a tiny checkpoint (+ the built-in tokenizer when available) once
per session; `fleet` starts router + 1 prefill + 1 decode on it (module scope) and stops it after.
"""

from __future__ import annotations

import os

import pytest

from .fleet import Fleet, start_fleet


def _write_model(path: str, arch: str) -> str:
    from glmserve.shared.weights.tiny import write_tiny_checkpoint

    kw = {}
    try:
        from glmserve.shared.tokenizer.builtin import BUILTIN_EOS_IDS, BUILTIN_PAD_ID, BUILTIN_VOCAB_SIZE, write_builtin_tokenizer

        kw = dict(vocab_size=BUILTIN_VOCAB_SIZE, eos_token_id=list(BUILTIN_EOS_IDS), pad_token_id=BUILTIN_PAD_ID)
    except ImportError:
        write_builtin_tokenizer = None
    write_tiny_checkpoint(path, arch, seed=0, **kw)
    if write_builtin_tokenizer is not None:
        write_builtin_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: _write_model(str(root / arch), arch) for arch in ("glm4_moe", "glm4_moe_lite")}


@pytest.fixture(scope="module")
def fleet(tiny_model_dirs, tmp_path_factory) -> Fleet:
    arch = os.environ.get("GLM_E2E_ARCH", "glm4_moe_lite")
    f = start_fleet(tiny_model_dirs[arch], str(tmp_path_factory.mktemp("fleet_logs")))
    yield f
    f.stop()
