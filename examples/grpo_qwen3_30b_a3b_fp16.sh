#!/usr/bin/env bash
# GRPO in FP16 on a MoE Qwen3-30B-A3B: Megatron TP=1 x EP=8 (experts split 8 ways inside DP), full
# activation recompute, beside vLLM at TP=2, on 8 GPUs of 141 GB (H200) or 80 GB.
#   HF_DIR=/ckpt/Qwen3-30B-A3B DATA=train.jsonl [NPROC=8] [OUT=runs/qwen3-30b-a3b] examples/grpo_qwen3_30b_a3b_fp16.sh [extra flags]
#   DRY_RUN=1 [GPU_MEMORY_GIB=80] HF_DIR=... examples/grpo_qwen3_30b_a3b_fp16.sh    # CPU: validate, build on meta, check the memory plan
# HF_DIR and DATA may also be given as the first two arguments. The memory plan (docs/gpu.md,
# tools/memory_plan.py) puts one rank's training state at ~72 GiB (FP16 weights, FP32 gradients,
# FP32 master weights and Adam moments of 3.6 B expert parameters, not sharded further since the
# expert-data-parallel size is 1). On 141 GB cards it stays on the device while training; on 80 GB
# cards the plan keeps the master weights and moments in host memory outside each optimizer step
# (--offload-optimizer), which costs a host round trip of ~43 GiB per GPU and mini-batch. The router
# runs in FP32 (PrecisionConfig.fp32_router).
RECIPE_OUT=runs/qwen3-30b-a3b-fp16 RECIPE_TP=1 RECIPE_EP=8 RECIPE_GPU_MEMORY_GIB=141 \
  RECIPE_EXTRA="--recompute full" exec "$(dirname "$0")/grpo_recipe.sh" "$@"
