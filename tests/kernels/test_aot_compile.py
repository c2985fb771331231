"""Every kernel compiles for sm_90 (H100/H200) at its real launch configs without a GPU: no compile error,
no register spills (stack / local memory), shared memory within Hopper's limit. Runs kernels.aot_check
in a subprocess because the interpreter (TRITON_INTERPRET=1, set for the other tests) replaces @jit."""

import os
import subprocess
import sys

import pytest
import triton

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton wheel without the bundled ptxas")
def test_all_kernels_compile_for_sm90_without_spills(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("KERNELS_POISON", None)
    proc = subprocess.run([sys.executable, "-m", "glmserve.kernels.aot_check"], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 15, proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(ln for ln in lines if "ok " not in ln) + proc.stderr[-2000:]
