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


def test_pdl_only_on_cuda_for_small_launches(monkeypatch):
    """Programmatic dependent launch: never on CPU tensors (the interpreter has no griddepcontrol), past
    PDL_MAX_ROWS rows only as PDL_LATE's wait-only mode 2, never when GLMSERVE_PDL turned it off; PDL= and
    launch_pdl= always agree."""
    import torch

    from glmserve.kernels import _common

    monkeypatch.setattr(_common, "PDL_ENABLED", True)
    assert _common.pdl_kw(torch.device("cpu"), 1) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setattr(_common, "cc_major", lambda device: 9)
    cuda = torch.device("cuda", 0)
    assert _common.pdl_kw(cuda, _common.PDL_MAX_ROWS) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(_common, "PDL_LATE", False)
    assert not _common.pdl_kw(cuda, _common.PDL_MAX_ROWS + 1)["launch_pdl"]
    monkeypatch.setattr(_common, "PDL_LATE", True)
    assert _common.pdl_kw(cuda, _common.PDL_MAX_ROWS + 1) == {"PDL": 2, "launch_pdl": True}
    assert _common.pdl_kw(cuda, _common.PDL_MAX_ROWS) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setattr(_common, "cc_major", lambda device: 8)
    assert not _common.pdl_kw(cuda, 1)["launch_pdl"]
    monkeypatch.setattr(_common, "cc_major", lambda device: 9)
    monkeypatch.setattr(_common, "PDL_ENABLED", False)
    assert not _common.pdl_kw(cuda, 1)["launch_pdl"]
