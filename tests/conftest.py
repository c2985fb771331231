"""Test-wide settings: CPU tests run with few threads (CI has 2 cores); `gpu` tests skip without CUDA."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# One fleet key for the session: every fleet a test starts (its processes inherit this environment)
# and every in-process encode/decode sign and check messages with it.
if not os.environ.get("GLMSERVE_FLEET_KEY_FILE"):
    import secrets

    os.environ.setdefault("GLMSERVE_FLEET_KEY", secrets.token_hex(32))

import pytest
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; it must be chosen before any test imports triton
    # (a kernel module imported un-interpreted by an earlier test breaks the interpreter's rewriter).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device by bench/gpu_suite.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
