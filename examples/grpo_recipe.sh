#!/usr/bin/env bash
# The launch logic shared by the FP16 GRPO recipes (grpo_qwen3_*.sh): they set RECIPE_OUT and
# RECIPE_EP and exec this script. Env: HF_DIR, DATA (or the first two arguments), NPROC, OUT, TP,
# EP, ROLLOUT_TP, STEPS, DRY_RUN=1 (CPU: validate the config, build the model on meta and check the
# memory plan for NPROC GPUs of GPU_MEMORY_GIB (the recipe's; 80) with ATTENTION (fused) kernels). Extra arguments
# go to examples/grpo_train.py and override the defaults below.
: "${RECIPE_OUT:?run a recipe script (examples/grpo_qwen3_*.sh), not this one}"
: "${RECIPE_EP:=1}"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${HF_DIR:-}" ]; then HF_DIR=${1:?set HF_DIR or pass it as the first argument}; shift; fi
if [ -z "${DATA:-}" ] && [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then DATA=$1; shift; fi
DATA=${DATA:-}
FLAGS=(
  --hf-dir "$HF_DIR" --out "${OUT:-$RECIPE_OUT}"
  --tp "${TP:-${RECIPE_TP:-2}}" --pp 1 --ep "${EP:-$RECIPE_EP}" --rollout-tp "${ROLLOUT_TP:-2}" --precision fp16
  --steps "${STEPS:-200}" --prompts-per-step 64 --group-size 8 --max-new-tokens 2048
  --micro-batch-size 4 --lr 1e-6
  --rl-loss ppo_clip --rl-clip-low 0.2 --rl-clip-high 0.28 --rl-correction token_tis --rl-correction-cap 2.0
  --rl-agg token-mean --rl-temperature 1.0 --rl-advantage-estimator grpo
)
# shellcheck disable=SC2206  # RECIPE_EXTRA is a recipe's own list of flags
FLAGS+=(${RECIPE_EXTRA:-})
if [ "${DRY_RUN:-0}" = "1" ]; then
  WORLD_SIZE=${NPROC:-8} exec "$PY" examples/grpo_train.py --dry-run --device-memory-gib "${GPU_MEMORY_GIB:-${RECIPE_GPU_MEMORY_GIB:-80}}" \
    --attention "${ATTENTION:-fused}" "${FLAGS[@]}" "$@"
fi
: "${DATA:?set DATA (JSONL of {\"prompt\", \"answer\"}) or pass it as the second argument}"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-8}" examples/grpo_train.py \
  --data "$DATA" "${FLAGS[@]}" "$@"
