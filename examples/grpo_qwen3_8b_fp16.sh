#!/usr/bin/env bash
# GRPO in FP16 on a dense Qwen3-8B: Megatron TP=2 (DP = NPROC/2) beside a colocated vLLM engine at TP=2.
#   HF_DIR=/ckpt/Qwen3-8B DATA=train.jsonl [NPROC=8] [OUT=runs/qwen3-8b] examples/grpo_qwen3_8b_fp16.sh [extra flags]
#   DRY_RUN=1 HF_DIR=... examples/grpo_qwen3_8b_fp16.sh    # CPU: validate the config, build the model on meta
# HF_DIR and DATA may also be given as the first two arguments.
RECIPE_OUT=runs/qwen3-8b-fp16 RECIPE_EP=1 exec "$(dirname "$0")/grpo_recipe.sh" "$@"
