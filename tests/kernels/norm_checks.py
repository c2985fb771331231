"""Checks shared by the tests of norms done inside other launches (moe_route_align's NORM_IN, moe_gemv's
next_norm): the norm's own launch must not run, and the outputs must be the norm launch's."""

import torch

from glmserve.kernels import rmsnorm


def forbid_norm_launches(monkeypatch) -> None:
    """From here on any rmsnorm.add_rms_norm(_fp8) call fails the test (the fused path must not fall back)."""
    def no_norm_launch(*_):
        raise AssertionError("the norm ran as its own launch")

    for name in ("add_rms_norm", "add_rms_norm_fp8"):
        monkeypatch.setattr(rmsnorm, name, no_norm_launch)


def assert_norm_outputs_match(got, want, exact: bool) -> None:
    """got, want: (y, s, (q, scale) or None) of an add + RMSNorm (+ FP8 form). s (the sum) bit-equal; y and the FP8
    form bit-equal where exact (the interpreter sums in one order), else within one bf16 step of y (the rstd's
    reduction shaped differently on a GPU), which moves an e4m3 value at most one step."""
    (y, s, fp8), (y_ref, s_ref, fp8_ref) = got, want
    assert torch.equal(s, s_ref)
    assert torch.equal(y, y_ref) if exact else torch.allclose(y.float(), y_ref.float(), rtol=8e-3, atol=1e-5)
    assert (fp8 is None) == (fp8_ref is None)
    if fp8 is None:
        return
    (q, qs), (q_ref, qs_ref) = fp8, fp8_ref
    if exact:
        assert torch.equal(qs, qs_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    else:
        torch.testing.assert_close(qs, qs_ref, rtol=8e-3, atol=0)
        torch.testing.assert_close(q.float() * qs, q_ref.float() * qs_ref, rtol=0.07, atol=qs.max().item())
