"""bench/kernels.py runs every section at SMOKE sizes (interpreter on CPU): no ERROR rows, sane numbers.
The real run happens once on a GPU; this keeps a typo from costing that run."""

import time

import torch

from bench import kernels as bench


def test_every_bench_section_runs_at_smoke_sizes(monkeypatch):
    def one_call_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(bench, "bench_ms", one_call_ms)
    ceil = {"hbm_GBps": 1.0, "bf16_TFLOPs": 1.0, "fp8_TFLOPs": 1.0}
    sz = bench.SMOKE if not torch.cuda.is_available() else bench.replace(bench.SMOKE, dev="cuda")
    rows = bench.run_sections(ceil, sz)
    errors = [r.shape for r in rows if r.kernel == "ERROR"]
    assert not errors, errors
    assert len(rows) >= 16 and all(r.ms > 0 and r.achieved > 0 for r in rows)
    assert "| rms_norm |" in bench.table(rows, ceil)


def test_ab_step_switches_name_real_kernel_settings():
    """bench/ab_step.py's switches (GPU-only tool): every one names an existing module attribute, so a renamed
    setting fails here rather than on the device."""
    import importlib

    from bench.ab_step import SWITCHES

    for module, attr, on, off in SWITCHES.values():
        value = getattr(importlib.import_module(module), attr)
        assert type(value) is type(on) is type(off)
