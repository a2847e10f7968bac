#!/usr/bin/env bash
# GRPO in FP16 on a dense Qwen3-8B: Megatron TP=2 (DP = NPROC/2) beside a colocated vLLM engine at TP=2.
#   HF_DIR=/ckpt/Qwen3-8B DATA=train.jsonl [NPROC=8] [OUT=runs/qwen3-8b] examples/grpo_qwen3_8b_fp16.sh [extra flags]
#   DRY_RUN=1 HF_DIR=... examples/grpo_qwen3_8b_fp16.sh    # CPU: validate the config, build the model on meta
# HF_DIR and DATA may also be given as the first two arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${HF_DIR:-}" ]; then HF_DIR=${1:?set HF_DIR or pass it as the first argument}; shift; fi
if [ -z "${DATA:-}" ] && [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then DATA=$1; shift; fi
DATA=${DATA:-}
FLAGS=(
  --hf-dir "$HF_DIR" --out "${OUT:-runs/qwen3-8b-fp16}"
  --tp "${TP:-2}" --pp 1 --ep 1 --rollout-tp "${ROLLOUT_TP:-2}" --precision fp16
  --steps "${STEPS:-200}" --prompts-per-step 64 --group-size 8 --max-new-tokens 2048
  --micro-batch-size 4 --lr 1e-6
  --rl-loss ppo_clip --rl-clip-low 0.2 --rl-clip-high 0.28 --rl-correction token_tis --rl-correction-cap 2.0
  --rl-agg token-mean --rl-temperature 1.0 --rl-advantage-estimator grpo
)
if [ "${DRY_RUN:-0}" = "1" ]; then
  exec "$PY" examples/grpo_train.py --dry-run "${FLAGS[@]}" "$@"
fi
: "${DATA:?set DATA (JSONL of {\"prompt\", \"answer\"}) or pass it as the second argument}"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-8}" examples/grpo_train.py \
  --data "$DATA" "${FLAGS[@]}" "$@"
