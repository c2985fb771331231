#!/usr/bin/env bash
# One GPU (nvidia-h200): `deploy up --device cuda` puts prefill and decode on GPU 0 (their KV link is
# the same-GPU cuda_ipc one); with two GPUs (nvidia-h200-x2) prefill on GPU 0 and decode on GPU 1 (NCCL
# link). GLM-4.7-Flash's real config with dummy weights (FP8 unless QUANT=""), then
# bench/run_sharegpt.py --dataset random 512 in / 256 out at concurrency 64 and 256.
# Env: OUT (out/onegpu), PY, PORT (8000), QUANT (fp8), NUM_PAGES (16384: 256 requests of 768 tokens need 12288),
# CONCS ("64 256"), DEPLOY_FLAGS (more `deploy up` flags, e.g. --disable_overlap_schedule), TAG (result-file tag),
# EXPERT_STATS (1: workers export experts touched per MoE layer, one scatter_add per layer per step; 0: off, as runs 1-12),
# MEM_FRACTION (e.g. 0.45: each worker's KV pages from its share of the GPU, --gpu_memory_utilization; an 80 GB
# H100 cannot hold two FP8 Flash copies and 2 x 16384 pages),
# MPS (deploy up --mps: unset = auto, on where prefill and decode share the GPU; 1 = on; 0 = off: the workers as
# plain processes, which the GPU time-slices).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; OUT=${OUT:-out/onegpu}; PORT=${PORT:-8000}; STATE=$OUT/state
mkdir -p "$OUT"
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT
# deploy's --mps: unset = auto (the fleet's own MPS daemon where prefill and decode share a GPU), 1 = on, 0 = off
MPSF=(); [ "${MPS:-}" = 1 ] && MPSF=(--mps on); [ "${MPS:-}" = 0 ] && MPSF=(--mps off)
Q=(); [ -n "${QUANT-fp8}" ] && Q=(--quantization "${QUANT-fp8}")
ES=(--expert_stats); [ "${EXPERT_STATS:-1}" = 0 ] && ES=()
[ -n "${MEM_FRACTION:-}" ] && ES+=(--gpu_memory_utilization "$MEM_FRACTION")
"$PY" -m glmserve.deploy up --detach --device cuda --preset glm-4.7-flash "${Q[@]}" --state_dir "$STATE" \
  --port "$PORT" --num_pages "${NUM_PAGES:-16384}" --max_running 256 --max_queue 4096 --ready_timeout 400 "${ES[@]}" \
  "${MPSF[@]}" ${DEPLOY_FLAGS:-} \
  || { tail -60 "$STATE"/logs/*.log; exit 1; }
# the fleet's MPS dirs as deploy rendered them (none: no mps program)
mps_dir() { sed -n "s/.*$1=\"\([^\"]*\)\".*/\1/p" "$STATE/supervisord.conf" | head -1; }
MPS_PIPE=$(mps_dir CUDA_MPS_PIPE_DIRECTORY); MPS_LOG=$(mps_dir CUDA_MPS_LOG_DIRECTORY)
cleanup=('s=$SECONDS; "$PY" -m glmserve.deploy down --state_dir "$STATE"; echo "deploy down: $((SECONDS - s)) s"'
         '[ -n "$MPS_LOG" ] && tail -3 "$MPS_LOG/control.log"')
grep -h "KV link to" "$STATE"/logs/decode_d0.log | head -2
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
# under MPS the compute apps are the MPS server (the workers are its clients) and the daemon lists its server
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
[ -n "$MPS_PIPE" ] && { echo "MPS daemon of the fleet: server list"
  echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE nvidia-cuda-mps-control; }
B=("$PY" bench/run_sharegpt.py --base-url "http://127.0.0.1:$PORT" --ignore-eos --disable-tqdm --result-dir "$OUT"
   --metrics-url "http://127.0.0.1:$PORT/metrics" --metrics-url http://127.0.0.1:8101/metrics
   --metrics-url http://127.0.0.1:8111/metrics --dataset random --random-input-len 512 --random-output-len 256)
for c in ${CONCS:-64 256}; do
  "${B[@]}" --num-prompts $((c * 4)) --max-concurrency "$c" --result-filename "onegpu${TAG:-}-c$c" 2>&1 | tee -a "$OUT/log.txt"
done
true
