"""kernels.backend wires every Triton op into shared.model.ops; CPU tensors keep the torch reference."""

import torch

from glmserve.kernels import backend
from glmserve.shared.model import ops


def test_install_wires_all_ops_and_keeps_cpu_reference():
    before = dict(ops.IMPL)
    try:
        names = backend.install(force=True)
        assert set(names) == set(ops.IMPL), set(ops.IMPL) - set(names)
        x, w = torch.randn(3, 8), torch.randn(8)
        assert ops.IMPL["rms_norm"].ref is before["rms_norm"]
        # CPU input -> reference path, bit-identical to calling the reference
        assert torch.equal(ops.rms_norm(x, w, 1e-5), before["rms_norm"](x, w, 1e-5))
        backend.install(force=True)  # idempotent: never wraps a wrapper
        assert ops.IMPL["rms_norm"].ref is before["rms_norm"]
    finally:
        ops.IMPL.update(before)
        backend._INSTALLED.clear()
