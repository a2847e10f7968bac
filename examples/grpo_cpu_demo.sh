#!/usr/bin/env bash
# The embedded default run: GRPO in FP16 on CPU with 2 ranks (Megatron TP=2 + colocated vLLM-CPU).
#   examples/grpo_cpu_demo.sh [--precision bf16] [--out runs/demo] [...]   (see grpo_cpu_demo.py -h)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# vLLM logs three INFO lines per weight sync and rank; VLLM_LOGGING_LEVEL=INFO brings them back.
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 examples/grpo_cpu_demo.py "$@"
