#!/usr/bin/env bash
# GPU kernel suite (H100/H200; torch 2.11 + triton 3.6 there): correctness at real GLM shapes, then the
# kernel benchmark with its ceilings. Target: under 4 minutes. Writes $OUT/kernels.json (or ./kernels.json).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu_info.csv"
py="${PYTHON:-python3}"
tests="tests/kernels"
# the sampler's gpu test needs msgspec (shared.protocol), which the device image lacks unless carried
"$py" -c "import msgspec" 2>/dev/null && tests="$tests tests/runner/test_sampler.py"
timeout 150 "$py" -m pytest -q -m gpu $tests -p no:cacheprovider --durations=10 2>&1 | tee "$out/gpu_kernel_tests.txt"
tests_rc=${PIPESTATUS[0]}
timeout 150 "$py" -m bench.kernels --out "$out/kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/kernel_bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu kernel tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
