#!/usr/bin/env bash
# LoRA GRPO in FP16 on a dense Qwen3-8B: rank-32 adapters on every linear layer (the base frozen),
# Megatron TP=2 (DP = NPROC/2) beside a colocated vLLM engine at TP=2 that serves the adapters
# (adapter-only sync: a few tens of MB per step instead of the 16 GB model). docs/lora.md.
#   HF_DIR=/ckpt/Qwen3-8B DATA=train.jsonl [NPROC=8] [OUT=runs/qwen3-8b-lora] examples/grpo_qwen3_8b_lora_fp16.sh
#   DRY_RUN=1 HF_DIR=... examples/grpo_qwen3_8b_lora_fp16.sh    # CPU: validate, build on meta, memory plan
# LoRA takes a learning rate about ten times full fine-tuning's; extra flags override these.
RECIPE_OUT=runs/qwen3-8b-lora-fp16 RECIPE_EP=1 \
  RECIPE_EXTRA="--lora-rank 32 --lora-alpha 64 --lora-sync adapter --lr 1e-5" \
  exec "$(dirname "$0")/grpo_recipe.sh" "$@"
