#!/usr/bin/env bash
# GRPO in FP16 on a MoE Qwen3-30B-A3B: Megatron TP=2 x EP=4 (experts split 4 ways inside DP) beside vLLM at TP=2.
#   HF_DIR=/ckpt/Qwen3-30B-A3B DATA=train.jsonl [NPROC=8] [OUT=runs/qwen3-30b-a3b] examples/grpo_qwen3_30b_a3b_fp16.sh [extra flags]
#   DRY_RUN=1 HF_DIR=... examples/grpo_qwen3_30b_a3b_fp16.sh    # CPU: validate the config, build the model on meta
# HF_DIR and DATA may also be given as the first two arguments.
# MoE under TP>1 trains with sequence parallelism; the router runs in FP32 (PrecisionConfig.fp32_router).
RECIPE_OUT=runs/qwen3-30b-a3b-fp16 RECIPE_EP=4 exec "$(dirname "$0")/grpo_recipe.sh" "$@"
