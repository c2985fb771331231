#!/usr/bin/env bash
# One GPU node, two GPUs: prefill on GPU 0, decode on GPU 1 (NCCL KV link), GLM-4.7-Flash's real config
# with dummy bf16 weights (--preset; or MODEL_DIR=/path for a checkpoint), then the load tests of issue 7
# and the 1k / 4k / 16k-token prompt runs of issue 3 with the fleet's KV-transfer figures.
#   bash deploy/gpu_bench.sh            # results in out/gpu_bench/*.json|png, tables in out/gpu_bench/log.txt
# Env: DEVICE (cuda), PARTS ("kv sharegpt random": any subset, to fit a time limit), NUM_PROMPTS (200), MTP_STEP (0),
#      EXPERT_STATS (1; 0 = without --expert_stats),
#      PORT (8000), OUT (out/gpu_bench).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python
OUT=${OUT:-out/gpu_bench}; PORT=${PORT:-8000}; N=${NUM_PROMPTS:-200}; STATE=$OUT/state
PARTS=${PARTS:-kv sharegpt random}
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the tiny default model, to check this script on CPU
if [ "$DEVICE" = cpu ]; then MODEL=(); TOK="$STATE/default_model"
elif [ -n "${MODEL_DIR:-}" ]; then MODEL=(--model_dir "$MODEL_DIR"); TOK="$MODEL_DIR"
else MODEL=(--preset glm-4.7-flash); TOK="$STATE/presets/glm-4.7-flash"; fi
MTP=(); [ "${MTP_STEP:-0}" != 0 ] && MTP=(--mtp_step "$MTP_STEP")
ES=(--expert_stats); [ "${EXPERT_STATS:-1}" = 0 ] && ES=()  # experts touched per MoE layer in /metrics
"$PY" -m glmserve.deploy up --detach --device "$DEVICE" "${MODEL[@]}" "${MTP[@]}" --state_dir "$STATE" --port "$PORT" \
  --prefill 1 --decode 1 --tp 1 --num_pages 16384 --max_running 256 --max_queue 4096 --ready_timeout 900 "${ES[@]}" \
  || { tail -50 "$STATE"/logs/*.log; exit 1; }
trap '"$PY" -m glmserve.deploy down --state_dir "$STATE"' EXIT
METRICS=(--metrics-url "http://127.0.0.1:$PORT/metrics" --metrics-url http://127.0.0.1:8101/metrics
         --metrics-url http://127.0.0.1:8111/metrics)
B=("$PY" bench/run_sharegpt.py --base-url "http://127.0.0.1:$PORT" --ignore-eos --disable-tqdm --result-dir "$OUT"
   "${METRICS[@]}")
{
  # issue 3: KV transfer for 1k, 4k, 16k-token prompts (one at a time, then 8 at once)
  has kv && for len in 1024 4096 16384; do
    "${B[@]}" --dataset random --random-input-len $len --random-output-len 16 --num-prompts 8 \
      --max-concurrency 1 --result-filename kv-$len-c1
    "${B[@]}" --dataset random --random-input-len $len --random-output-len 16 --num-prompts 8 --result-filename kv-$len-burst
  done
  # issue 7: the seeds' workloads on (synthetic) ShareGPT, and 8k/1k, 1k/8k, 1k/1k random
  has sharegpt && "${B[@]}" --dataset sharegpt --tokenizer "$TOK" --num-prompts "$N" --workload all \
    --result-filename sharegpt
  has random && "${B[@]}" --dataset random --random-input-len 8192 --random-output-len 1024 --num-prompts 64 --max-concurrency 32 --result-filename r8k1k
  has random && "${B[@]}" --dataset random --random-input-len 1024 --random-output-len 8192 --num-prompts 32 --max-concurrency 32 --result-filename r1k8k
  has random && "${B[@]}" --dataset random --random-input-len 1024 --random-output-len 1024 --num-prompts 256 --sweep concurrency \
    --sweep-values 1,4,16,64,256 --result-filename r1k1k
  true  # a PARTS without "random" must not make the script fail
} 2>&1 | tee -a "$OUT/log.txt"
