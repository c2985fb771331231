"""Tiny checkpoints shared by the model tests (written once per session)."""

import pytest

from glmserve.shared.weights.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(str(root / arch), arch, seed=1) for arch in ("glm4_moe", "glm4_moe_lite")}
