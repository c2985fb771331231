#!/usr/bin/env bash
# The GPU check-and-benchmark suite, run on the device machine (nvidia-h200-x2: prefill on GPU 0,
# decode on GPU 1) in phases that each fit one 10-minute call:
#   bash bench/gpu_suite.sh models   # bf16 parity, CUDA graphs, TP=2 over NCCL, NCCL KV link, KV GB/s vs NCCL
#   bash bench/gpu_suite.sh fleet    # prefill->decode pair on 2 GPUs (tiny + GLM-4.7-Flash dummy), MTP step times
#   bash bench/gpu_suite.sh kernels  # kernel correctness at real shapes + bench/kernels.py (one GPU)
#   bash bench/gpu_suite.sh final    # the re-checks of models, link, pair, plus a decode-step profile
#   bash bench/gpu_suite.sh handoff  # short: the GPU worker-pair tests (4096-token handoff) + KV GB/s + link tests
#   bash bench/gpu_suite.sh prefill  # MLA expanded prefill checks, bench.prefill_step, fleet 1k/4k/16k TTFT
#   bash bench/gpu_suite.sh mla      # MLA decode split rule: tests, kernel before/after, decode step at 16k
#   bash bench/gpu_suite.sh tp       # nvidia-h200-x4: TP 2 prefill + TP 2 decode worker pairs (MTP too)
#   bash bench/gpu_suite.sh serve    # deploy up --device cuda + short load tests (bench/run_sharegpt.py)
#   bash bench/gpu_suite.sh profile  # one decode step, bf16 and FP8, batch 1/64/128/256: per-kernel times, roofline
#   bash bench/gpu_suite.sh onegpu   # nvidia-h200 (ONE GPU): cuda_ipc link checks + GB/s vs a device copy, then
#                                    # the fleet with prefill and decode on GPU 0, random 512/256 at c64 and c256
#   bash bench/gpu_suite.sh overlap  # ONE GPU: decode overlap-loop tests, FP8 step profile (B 1, 256), the fleet
#                                    # as onegpu per OVERLAP_MODES (on / off); OVERLAP_PARTS picks the parts
#   bash bench/gpu_suite.sh final14  # ONE GPU: kernel checks, decode-step table FP8 (+ B 256 profile) and bf16, fleet c64/c256
#   bash bench/gpu_suite.sh steponly # ONE GPU: attention/routing/MLA-wg/GEMM kernel checks + the FP8 decode-step table
#   bash bench/gpu_suite.sh sweep    # ONE GPU: MLA decode and FP8 GEMM launch configs at decode sizes (HBM fractions)
#   bash bench/gpu_suite.sh fleet14  # issue 14's fleet goal: FP8, random 512/256 at c64 and c256 (x2: P GPU 0, D GPU 1)
#   bash bench/gpu_suite.sh prefleet # ONE call: FP8 prefill of 64 x 512-token prompts (+ its kernel table), then
#                                    # fleet14's fleet
#   bash bench/gpu_suite.sh mps      # ONE GPU: the one-GPU fleet (c64, c256) with and without a CUDA MPS server
#   bash bench/gpu_suite.sh ncu14    # ONE GPU: A/B of the run-40 switches, then one FP8 layer under Nsight Compute
#   bash bench/gpu_suite.sh norm45   # ONE GPU: two norms into the MoE's launches (router, down GEMV): tests, A/Bs, steps
#   bash bench/gpu_suite.sh check44  # ONE GPU: runs 42-43's defaults on the serving paths (GPU model / worker tests),
#                                    # the step table (gemv14, run 42: at e0cec33; defaults14, run 43: at 1d0448c)
# The one-off H100 phases of runs 15-35 (h100b ... h100u, ab5) were removed on 2026-12-07: each run's command and commit
# are in bench/gpu_results/README.md (git show COMMIT:bench/gpu_suite.sh has the phase).
#   bash bench/gpu_suite.sh check14  # ONE call: norm / routing / MoE kernel checks, the FP8 decode-step table with
#                                    # per-kernel HBM fractions at B 256, then fleet14's fleet (8 files back)
# Carried wheels (.whl: pyzmq, msgspec, starlette, uvicorn, httptools, uvloop, supervisor) are installed first when
# present; .whl is not committed: fetch them here (the GPU image runs Python 3.12, no network) with
#   .venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl pyzmq msgspec starlette uvicorn httptools uvloop \
#     supervisor prometheus-client httpx h11 anyio sniffio idna click httpcore certifi
# and run with carry [".whl"].
# Writes logs and JSON under $OUT (default ./out/gpu); prints a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
summary=()
worker_logs() {  # worker_logs BASETEMP FILE: per worker log, its WARNING/ERROR lines (with 3 lines after:
  # tracebacks, thread stacks) and its last 60 lines
  for f in "$1"/*/*.log; do
    [ -f "$f" ] || continue
    echo "=== $f"; echo "--- WARNING/ERROR lines"; grep -n -A3 -E 'WARNING|ERROR|Traceback' "$f" | head -300
    echo "--- thread stacks"; grep -n -A150 'thread stacks at teardown' "$f" | head -600
    echo "--- last 60 lines"; tail -60 "$f"
  done > "$2" 2>&1
}
serve_logs() {  # serve_logs HEAD TAIL WORKER...: the fleet's logs (deploy/gpu_bench.sh) as flat files under
  # $OUT (the device tool returns only shallow files, 8 at most): WARNING/ERROR lines, then the last lines
  for w in "${@:3}"; do
    local f="$OUT/serve/state/logs/$w.log"
    [ -f "$f" ] && { grep -n -A3 -E 'WARNING|ERROR|Traceback' "$f" | head -"$1"; echo ...; tail -"$2" "$f"; } \
      > "$OUT/serve_$w.txt"
  done
}
left() {  # left CAP: seconds to the phase's deadline ($end), at most CAP, at least 1 (`timeout 0` means none)
  local r=$((end - SECONDS)); [ "$r" -lt 1 ] && r=1; [ "$r" -lt "$1" ] && echo "$r" || echo "$1"
}
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.txt, remember rc
  local name=$1 t=$2; shift 2
  echo "=== $name: $*"
  timeout "$t" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  tail -25 "$OUT/$name.txt"
  summary+=("$name rc=$rc")
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
case "${1:-models}" in
  models)
    step models_gpu 300 $PY -m pytest -q -s -m gpu tests/models -p no:cacheprovider
    step kvlink_nccl 150 $PY -m pytest -q -s -m gpu tests/kvcache/test_link_nccl.py -p no:cacheprovider
    step kv_transfer 150 $PY -m bench.kv_transfer --device cuda --gpus 0,1 --out "$OUT/kv_transfer.json"
    ;;
  fleet)
    step workers_gpu 330 $PY -m pytest -q -s -m gpu tests/workers/test_gpu_workers.py -p no:cacheprovider
    step mtp_step 200 $PY -m bench.mtp_step --out "$OUT/mtp_step.json"
    ;;
  final)  # re-checks after fixes, in one call, most important first; each step gets what is left of ~570 s
    # (worker pair with the KV send gate, KV GB/s, gate-off A/B, link tests, step profile, models)
    end=$((SECONDS + ${FINAL_BUDGET_S:-570}))
    step workers_gpu "$(left 230)" $PY -m pytest -q -s -m gpu tests/workers/test_gpu_workers.py \
      tests/workers/test_decode_graphs_worker.py -p no:cacheprovider --basetemp=/tmp/wgpu \
      --deselect "tests/workers/test_gpu_workers.py::test_gpu_link_send_then_device_sync_before_recv[0]"
    worker_logs /tmp/wgpu "$OUT/worker_logs.txt"
    step kv_transfer "$(left 70)" $PY -m bench.kv_transfer --device cuda --gpus 0,1 --out "$OUT/kv_transfer.json"
    # A/B of the KV send gate on the large handoff (226 MB in one push): gate off = the old order
    # (NCCL send posted before the decode posts its recv); expected to fail if the gate is the fix
    # (the isolated mechanism first: send posted, device-wide sync, only then the recv; ~10 s)
    step workers_nogate "$(left 100)" env KVLINK_SEND_GATE=0 $PY -m pytest -q -s -m gpu \
      "tests/workers/test_gpu_workers.py::test_gpu_link_send_then_device_sync_before_recv[0]" \
      "tests/workers/test_gpu_workers.py::test_gpu_pair_flash_dummy_bf16[4096]" -p no:cacheprovider --basetemp=/tmp/wgpu0
    worker_logs /tmp/wgpu0 "$OUT/worker_logs_nogate.txt"
    step kvlink_nccl "$(left 110)" $PY -m pytest -q -s -m gpu tests/kvcache/test_link_nccl.py -p no:cacheprovider
    step profile_step "$(left 110)" $PY -m bench.profile_step --batches 1,16,64,128 --verify_tokens 1,4 --ctx 512 \
      --out "$OUT/profile_step.json"
    step models_gpu "$(left 120)" $PY -m pytest -q -s -m gpu tests/models/test_gpu.py tests/models/test_decode_graphs.py \
      -p no:cacheprovider
    ;;
  handoff)  # the short re-check of the KV handoff fix (send gate, link epochs): pair tests, then KV GB/s
    t=tests/workers/test_gpu_workers.py  # most telling first: the machine may be taken back early
    step workers_gpu 170 $PY -m pytest -q -s -m gpu -p no:cacheprovider --basetemp=/tmp/wgpu \
      "$t::test_gpu_pair_flash_dummy_bf16[4096]" "$t::test_gpu_pair_tiny_fp32_equals_generate[2]" \
      "$t::test_gpu_link_send_then_device_sync_before_recv[1]" "$t::test_gpu_pair_flash_dummy_bf16[1024]" \
      "$t::test_gpu_pair_tiny_fp32_equals_generate[0]" "$t::test_gpu_link_send_then_device_sync_before_recv[0]"
    worker_logs /tmp/wgpu "$OUT/worker_logs.txt"
    step kv_transfer 80 $PY -m bench.kv_transfer --device cuda --gpus 0,1 --reps 3 --out "$OUT/kv_transfer.json"
    step kvlink_nccl 90 $PY -m pytest -q -s -m "gpu or not gpu" tests/kvcache/test_link_nccl.py \
      tests/kernels/test_kv_pages.py -p no:cacheprovider
    ;;
  prefill)  # MLA expanded prefill + 8192-token chunks: GPU checks, prefill times, then the fleet's 1k/4k/16k runs
    end=$((SECONDS + ${PREFILL_BUDGET_S:-560}))
    step kernels_vs_refs "$(left 90)" $PY -m pytest -q -s -m gpu -p no:cacheprovider \
      tests/kernels/test_model_with_kernels.py tests/kernels/test_paged_attention.py
    step prefill_step "$(left 150)" $PY -m bench.prefill_step --tokens 1024,4096,16384 --reps 2 \
      --out "$OUT/prefill_step.json"
    step serve "$(left 240)" env OUT="$OUT/serve" PY=$PY PARTS=kv bash deploy/gpu_bench.sh
    serve_logs 100 40 prefill_p0 decode_d0 router  # 8 files come back at most
    rm -rf "$OUT/serve"  # the tables are in serve.txt; the device tool returns at most 8 files
    step pair_4096 "$(left 120)" $PY -m pytest -q -s -m gpu -p no:cacheprovider --basetemp=/tmp/wgpu \
      "tests/workers/test_gpu_workers.py::test_gpu_pair_flash_dummy_bf16[4096]"
    ;;
  mla)  # MLA decode splits: kernel tests, before/after kernel times, decode steps at 16k context
    step kernel_tests 120 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py \
      ${MLA_GRAPH_TESTS-tests/models/test_decode_graphs.py}
    step mla_splits 100 $PY -m bench.mla_splits
    [ -n "${MLA_QUICK:-}" ] && exit 0
    step profile_16k 150 $PY -m bench.profile_step --batches 1,16 --ctx 16384 --out "$OUT/profile_16k.json"
    ;;
  tp)  # nvidia-h200-x4: prefill TP 2 on GPUs 0,1, decode TP 2 on GPUs 2,3 (with and without MTP)
    step workers_tp2 300 $PY -m pytest -q -s -m gpu -p no:cacheprovider --basetemp=/tmp/wtp \
      tests/workers/test_gpu_workers.py::test_gpu_pair_tp2_equals_generate
    worker_logs /tmp/wtp "$OUT/worker_logs_tp2.txt"
    step models_tp 150 $PY -m pytest -q -s -m gpu tests/models/test_gpu.py::test_tp2_nccl_matches_tp1 -p no:cacheprovider
    ;;
  kernels)
    OUT=$OUT step kernels 400 bash bench/gpu_kernels.sh
    ;;
  kvipc)  # the same-GPU KV link alone (bench/kv_ipc.py, with its stage times)
    step kv_ipc 90 $PY -m bench.kv_ipc --reps 5 --out "$OUT/kv_ipc.json"
    ;;
  profile)  # issue 14: one decode step, bf16 and FP8 weights, batch 1/64/128/256, with HBM-roofline fractions
    step moe_tests 120 $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/kernels/test_fused_moe.py \
      tests/kernels/test_model_with_kernels.py
    [ -z "${PROFILE_FP8_ONLY:-}" ] && step profile_bf16 280 $PY -m bench.profile_step --batches ${PROFILE_BATCHES:-1,64,128,256} --ctx 640 \
      --out "$OUT/profile_bf16.json"
    step profile_fp8 280 $PY -m bench.profile_step --batches ${PROFILE_BATCHES:-1,64,128,256} --ctx 640 \
      --quantization fp8 --out "$OUT/profile_fp8.json"
    ;;
  onegpu)  # one GPU: prefill and decode share it; their KV link is the same-GPU one (cuda_ipc)
    end=$((SECONDS + ${ONEGPU_BUDGET_S:-570}))
    step ipc_tests "$(left 120)" $PY -m pytest -q -s -m "gpu or not gpu" -p no:cacheprovider \
      tests/kvcache/test_bench_kv_ipc.py tests/kvcache/test_ipc_link.py tests/kernels/test_kv_pages.py
    step kv_ipc "$(left 90)" $PY -m bench.kv_ipc --reps 5 --out "$OUT/kv_ipc.json"
    step serve1 "$(left 420)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" bash deploy/gpu_onegpu.sh
    cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
    serve_logs 100 40 prefill_p0 decode_d0 router
    rm -rf "$OUT/serve"
    ;;
  overlap)  # issue 14: the decode overlap loop on one GPU: its tests, the FP8 step profiled at B 1 and 256, then
    # the one-GPU fleet per OVERLAP_MODES ("on", "off" = --disable_overlap_schedule) at CONCS ("64 256")
    end=$((SECONDS + ${OVERLAP_BUDGET_S:-570}))
    parts=" ${OVERLAP_PARTS:-tests profile serve} "
    [[ $parts == *" tests "* ]] && step overlap_tests "$(left 150)" $PY -m pytest -q -s -m "gpu or not gpu" \
      -p no:cacheprovider tests/workers/test_overlap.py
    [[ $parts == *" profile "* ]] && step profile_fp8 "$(left 200)" $PY -m bench.profile_step --batches 1,64,256 \
      --profile_batches 1,256 --ctx 640 --quantization fp8 --out "$OUT/profile_fp8.json"
    if [[ $parts == *" serve "* ]]; then
      for mode in ${OVERLAP_MODES:-on}; do
        flags=""; [ "$mode" = off ] && flags="--disable_overlap_schedule"
        step "serve_$mode" "$(left 420)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" DEPLOY_FLAGS="$flags" \
          TAG="-$mode" CONCS="${CONCS:-64 256}" bash deploy/gpu_onegpu.sh
        cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
        serve_logs 80 30 decode_d0 prefill_p0
        for w in decode_d0 prefill_p0; do mv "$OUT/serve_$w.txt" "$OUT/serve_${mode}_$w.txt" 2>/dev/null; done
        rm -rf "$OUT/serve"
      done
    fi
    ;;
  final14)  # issue 14's closing run on ONE GPU: kernel checks, the decode-step table (FP8 with the B 256 profile,
    # then bf16 if time is left) and the one-GPU fleet with the overlap loop at c64 and c256
    end=$((SECONDS + ${FINAL_BUDGET_S:-560}))
    step kernel_tests "$(left 150)" $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/kernels/test_moe_route.py \
      tests/kernels/test_fp8_gemm.py tests/kernels/test_paged_attention.py tests/kernels/test_fused_moe.py
    step profile_fp8 "$(left 170)" $PY -m bench.profile_step --batches 1,64,128,256 --profile_batches 256 --ctx 640 \
      --quantization fp8
    step serve_on "$(left 270)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" TAG="-on" bash deploy/gpu_onegpu.sh
    cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
    serve_logs 80 30 decode_d0 prefill_p0
    rm -rf "$OUT/serve"
    step profile_bf16 "$(left 150)" $PY -m bench.profile_step --batches 1,64,128,256 --ctx 640 --no_profile
    ;;
  steponly)  # kernel checks of attention, MoE routing and the run-35 defaults (MLA q by cp.async, early GEMM
    # scales), then the FP8 decode-step table alone (no profiler tables)
    step kernel_tests 200 $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/kernels/test_paged_attention.py \
      tests/kernels/test_moe_route.py tests/kernels/test_gpu_real_shapes.py tests/kernels/test_fp8_gemm.py \
      -k "not gpu_real_shapes or mla_decode_wg"
    step profile_fp8 200 $PY -m bench.profile_step --batches 1,64,128,256 --ctx 640 --quantization fp8 --no_profile
    ;;
  ncu14)  # ONE GPU (~8 min): run 40's switches (MLA early page ids, fp32 logits) -- their GPU tests and in-process
    # A/B -- then one MoE layer of the FP8 step at B 1 and B 256 under Nsight Compute (bench/ncu_layer.py)
    end=$((SECONDS + ${NCU_BUDGET_S:-560}))
    step kernel_tests "$(left 120)" $PY -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_gpu_real_shapes.py \
      -k "early_pages or lm_head"
    step ab "$(left 220)" $PY -m bench.ab_step --switch "${AB_SWITCHES:-mla_early_pages,lm_fp32}" --batches 1,64,256 \
      --rounds 3 --ctx 640 --quantization fp8
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    step ncu_layer "$(left 260)" "$ncu" --profile-from-start off --clock-control none --set full -f -o "$OUT/layer" \
      $PY -m bench.ncu_layer --batches 1,256 --ctx 640
    step ncu_details "$(left 60)" "$ncu" --import "$OUT/layer.ncu-rep" --page details --print-units base
    ;;
  check44)  # ONE GPU (~5 min): run 44, the defaults of runs 42-43 (dense GEMV at M <= 2, the GEMVs quantizing their
    # own input, the MoE GEMV at T 1, the cache write in the W_UK launch at T 1) on the serving paths: the one-GPU model
    # and worker GPU tests (CUDA graphs against eager, FP8 against dequantized, the overlap loop against generate),
    # then the step table (decode at B 1 / 2 / 4 / 64 / 256, MTP verify of 2 tokens a sequence at B 1 / 2)
    end=$((SECONDS + ${CHECK_BUDGET_S:-480}))
    # the worker tests import msgspec / zmq: without carry [".whl"] they fail at collection (run 44's first call)
    $PY -c "import msgspec, zmq" 2>/dev/null || { echo "check44: msgspec / pyzmq missing: run with carry [\".whl\"]"; exit 2; }
    step path_tests "$(left 240)" $PY -m pytest -q -m gpu -p no:cacheprovider tests/models/test_decode_graphs.py \
      tests/models/test_gpu.py tests/workers/test_overlap.py tests/kernels/test_gpu_decode_gemms.py -k "not tma_mid"
    step profile_decode "$(left 100)" $PY -m bench.profile_step --batches 1,2,4,64,256 --ctx 640 --quantization fp8 \
      --no_profile
    step profile_verify "$(left 60)" $PY -m bench.profile_step --batches 1,2 --verify_tokens 2 --ctx 640 \
      --quantization fp8 --no_profile
    ;;
  norm45)  # ONE GPU (~8 min): run 45, two norms into the MoE's launches (off): the post-attention norm inside the
    # router's (moe_route_align.NORM_MAX_T) and the next layer's input norm by the down GEMV's last program
    # (fused_moe.NEXT_NORM_MAX_T): their GPU tests (the launches in CUDA graphs at Flash / GLM-4.5 shapes, the tiny
    # model against the separate norms), the in-process A/Bs at B 1 / 2 / 4, then the step table with both on
    end=$((SECONDS + ${NORM_BUDGET_S:-560}))
    step norm_tests "$(left 170)" $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider \
      tests/kernels/test_gpu_real_shapes.py tests/kernels/test_moe_route.py tests/kernels/test_fp8_gemv.py \
      tests/kernels/test_model_with_kernels.py -k "norm_in or route_align or next_norm or inside_the_moe"
    step ab_norm "$(left 260)" $PY -m bench.ab_step --switch route_norm,moe_next_norm --batches 1,2,4 --rounds 3 \
      --ctx 640 --quantization fp8
    step profile_norm "$(left 120)" $PY -m bench.profile_step --batches 1,2,4,64,256 --ctx 640 --quantization fp8 \
      --no_profile --switches_on route_norm,moe_next_norm
    ;;
  sweep)  # issue 14: launch configs of MLA decode and the block-scaled FP8 GEMM at decode batch sizes
    step decode_sweep 400 $PY -m bench.decode_sweep --only "${SWEEP_ONLY:-mla,gemm}" --out "$OUT/decode_sweep.json"
    ;;
  fleet14)  # issue 14's fleet goal as stated: FP8 dummy Flash, random 512 in / 256 out at c64 and c256, overlap
    # loop on; on nvidia-h200-x2 prefill on GPU 0 and decode on GPU 1 (NCCL link), on one GPU both on GPU 0
    ngpu=$(nvidia-smi -L | wc -l)
    [ -n "${SKIP_EXPERT_TESTS:-}" ] || step expert_tests 120 $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider \
      tests/workers/test_expert_stats.py
    step "serve_${ngpu}gpu" "${SERVE_S:-540}" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" TAG="-${ngpu}gpu" \
      CONCS="${CONCS:-64 256}" bash deploy/gpu_onegpu.sh
    cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
    serve_logs 80 30 decode_d0 prefill_p0 router
    rm -rf "$OUT/serve"
    ;;
  mps)  # ONE GPU (~4 min): the one-GPU fleet (fleet14's) with the workers as plain processes, which the GPU
    # time-slices, and as clients of the fleet's CUDA MPS daemon (deploy up --mps on), per MPS_MODES ("off on";
    # "auto": deploy's default, which picks MPS on one GPU), at CONCS ("64 256")
    end=$((SECONDS + ${MPS_BUDGET_S:-570}))
    i=0
    for mode in ${MPS_MODES:-off on}; do
      i=$((i + 1)); [ $i -gt 1 ] && mode="${mode}$i"  # a mode named twice keeps both results (off, on2, off3, ...)
      m=0; [[ $mode == on* ]] && m=1; [[ $mode == auto* ]] && m=""  # auto: deploy's default --mps
      step "serve_mps_$mode" "$(left 290)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" MPS=$m \
        MEM_FRACTION="${MEM_FRACTION:-0.47}" TAG="-mps_$mode" CONCS="${CONCS:-64 256}" bash deploy/gpu_onegpu.sh
      cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
      serve_logs 40 15 decode_d0 prefill_p0 mps  # appended to the step's log: 3 files a mode come back
      for w in decode_d0 prefill_p0 mps; do
        [ -f "$OUT/serve_$w.txt" ] && { echo "=== $w"; cat "$OUT/serve_$w.txt"; rm "$OUT/serve_$w.txt"; }
      done >> "$OUT/serve_mps_$mode.txt"
      rm -rf "$OUT/serve"
    done
    ;;
  prefleet)  # the fleet's prefill side in isolation (64 prompts of 512 tokens, 8192-token forwards), then the fleet
    end=$((SECONDS + ${PREFLEET_BUDGET_S:-570}))
    ngpu=$(nvidia-smi -L | wc -l)
    step prefill_fp8 "$(left 150)" $PY -m bench.prefill_step --tokens 512 --prompts 64 \
      --configs absorbed:8192,expanded:8192 --quantization fp8 --profile --out "$OUT/prefill_fp8.json"
    step "serve_${ngpu}gpu" "$(left 400)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" TAG="-${ngpu}gpu" \
      CONCS="${CONCS:-64 256}" bash deploy/gpu_onegpu.sh
    cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
    serve_logs 60 25 decode_d0 prefill_p0 router
    rm -rf "$OUT/serve"
    ;;
  check14)  # issue 14 in one call (~9 min): kernel checks, FP8 step table + per-kernel HBM (B 256), the fleet
    end=$((SECONDS + ${CHECK_BUDGET_S:-570}))
    ngpu=$(nvidia-smi -L | wc -l)
    step kernel_tests "$(left 120)" $PY -m pytest -q -m "gpu or not gpu" -p no:cacheprovider \
      tests/kernels/test_elementwise.py tests/kernels/test_moe_route.py tests/kernels/test_fused_moe.py \
      tests/models/test_shared_fusion.py tests/kernels/test_model_with_kernels.py tests/workers/test_expert_stats.py
    step profile_fp8 "$(left 170)" $PY -m bench.profile_step --batches 1,64,128,256 --profile_batches 256 --ctx 640 \
      --quantization fp8
    step "serve_${ngpu}gpu" "$(left 330)" env OUT="$OUT/serve" PY=$PY QUANT="${QUANT-fp8}" TAG="-${ngpu}gpu" \
      CONCS="${CONCS:-64 256}" bash deploy/gpu_onegpu.sh
    cp "$OUT"/serve/*.json "$OUT"/ 2>/dev/null
    serve_logs 60 25 decode_d0 prefill_p0 router
    rm -rf "$OUT/serve"
    ;;
  serve)
    step serve "${SERVE_S:-540}" env OUT="$OUT/serve" PY=$PY PARTS="${PARTS:-kv}" NUM_PROMPTS="${NUM_PROMPTS:-100}" \
      bash deploy/gpu_bench.sh
    serve_logs 200 80 prefill_p0 decode_d0 router supervisord
    ;;
esac
printf '%s\n' "${summary[@]}"
