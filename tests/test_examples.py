"""The GPU recipes on CPU: dry runs validate the config and build rank 0's shard on the meta device.

The fake HF configs carry the real Qwen3-8B / Qwen3-30B-A3B dimensions; the parameter counts are
checked against formulas written here from the published shapes, not against captured output.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ROPE = {"rope_theta": 1000000, "rope_type": "default"}
COMMON = dict(vocab_size=151936, tie_word_embeddings=False, rms_norm_eps=1e-6, hidden_act="silu",
              max_position_embeddings=40960, rope_parameters=ROPE, num_attention_heads=32, head_dim=128)
DENSE = dict(COMMON, model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_key_value_heads=8,
             intermediate_size=12288)
MOE = dict(COMMON, model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_key_value_heads=4,
           intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
           norm_topk_prob=True)


def _hf_dir(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def _run(cmd, env=None):
    full_env = dict(os.environ, PY=PY, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def _summary(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRY-RUN ")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0][len("DRY-RUN "):])


def _rank0_params(cfg, tp, ep):
    """Rank 0's parameters at TP=tp, EP=ep, PP=1: sharded matrices divided, norms/router replicated."""
    h, hd, layers = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    attn = h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) // tp
    if "num_experts" in cfg:
        mlp = h * cfg["num_experts"] + cfg["num_experts"] // ep * 3 * h * cfg["moe_intermediate_size"] // tp
    else:
        mlp = 3 * h * cfg["intermediate_size"] // tp
    embed_and_head = 2 * cfg["vocab_size"] * h // tp  # 151936 is already a multiple of the padding
    return embed_and_head + layers * (attn + mlp + 2 * h + 2 * hd) + h


@pytest.mark.parametrize("script,cfg,layout,total_b", [
    ("grpo_qwen3_8b_fp16.sh", DENSE, dict(tp=2, pp=1, ep=1), (7.9, 8.5)),
    ("grpo_qwen3_30b_a3b_fp16.sh", MOE, dict(tp=1, pp=1, ep=8), (30.0, 31.0)),
])
def test_recipe_dry_run(tmp_path, script, cfg, layout, total_b):
    proc = _run(["bash", f"examples/{script}"], env=dict(DRY_RUN="1", HF_DIR=_hf_dir(tmp_path, cfg)))
    s = _summary(proc)
    assert {k: s["layout"][k] for k in layout} == layout
    assert s["precision"] == "fp16" and s["rank0_param_dtypes"] == ["float16"] and s["device"] == "meta"
    assert s["loss"] == "ppo_clip" and s["correction"] == "token_tis" and s["group_size"] == 8
    assert total_b[0] < s["params_b"] < total_b[1]
    expected = _rank0_params(cfg, layout["tp"], layout["ep"]) / 1e9
    assert abs(s["rank0_params_b"] - expected) < 2e-3, (s["rank0_params_b"], expected)
    if cfg is MOE:
        assert 3.0 < s["active_params_b"] < 3.6 and s["sequence_parallel"] is (layout["tp"] > 1)
    # The memory plan for the recipe's 8 GPUs fits the GPU it names (80 GB; 141 GB for the MoE).
    memory = s["plan"]["memory"]
    assert memory["device_gib"] == (141 if cfg is MOE else 80) and memory["peak"]["gib"] < memory["device_gib"]
    assert s["plan"]["distributed_optimizer"] is True


def test_the_moe_recipe_on_80gb_gpus_keeps_the_optimizer_state_on_the_host_between_steps(tmp_path):
    """On 80 GB cards the Qwen3-30B-A3B recipe's training state (FP16 weights, FP32 gradients,
    master weights and moments of 3.6 B expert parameters, not sharded: expert-data-parallel size
    1) and its activations do not fit together; with the master weights and moments in host memory
    outside each optimizer step they do. Without offload the plan refuses, naming them."""
    hf = _hf_dir(tmp_path, MOE)
    env = dict(DRY_RUN="1", HF_DIR=hf, GPU_MEMORY_GIB="80")
    s = _summary(_run(["bash", "examples/grpo_qwen3_30b_a3b_fp16.sh"], env=env))
    memory = s["plan"]["memory"]
    assert s["plan"]["offload"] is True and s["plan"]["offload_optimizer"] is True
    assert set(memory["phases_gib"]) == {"rollout", "training", "optimizer", "refit"}
    assert memory["peak"]["phase"] == "optimizer" and memory["peak"]["gib"] < 0.95 * 80
    assert "optimizer_state" not in memory["phases_gib"]["training"]
    # 3.6 B expert parameters per GPU (128 experts over EP 8, 3 matrices of 2048 x 768 in 48 layers):
    # their master weights and two moments alone are 12 bytes each.
    experts = MOE["num_hidden_layers"] * MOE["num_experts"] // 8 * 3 * MOE["hidden_size"] * MOE["moe_intermediate_size"]
    assert memory["components_gib"]["optimizer_state"] >= 8 * experts / 2**30
    for flags in (["--no-offload"], ["--offload", "--no-offload-optimizer"]):
        proc = _run(["bash", "examples/grpo_qwen3_30b_a3b_fp16.sh", *flags], env=env)
        assert proc.returncode == 2 and "the largest is optimizer_state" in proc.stderr, (flags, proc.stderr[-2000:])


def test_lora_recipe_dry_run(tmp_path):
    """The LoRA variant of the 8B recipe: the plan's adapter-only sync and engine limit, and the trainer
    state shrunk to the adapters' (counted here from the shapes: r · (in + out) per module, per TP rank)."""
    proc = _run(["bash", "examples/grpo_qwen3_8b_lora_fp16.sh"], env=dict(DRY_RUN="1", HF_DIR=_hf_dir(tmp_path, DENSE)))
    s = _summary(proc)
    lora = s["plan"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["sync"], lora["engine_max_lora_rank"]) == (32, 64.0, "adapter", 32)
    assert sorted(lora["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    r, h, tp, layers = 32, DENSE["hidden_size"], 2, DENSE["num_hidden_layers"]
    q, kv, f = 32 * 128, 8 * 128, DENSE["intermediate_size"]
    # column layers: A [roles * r, in] replicated, B [out / tp, roles * r]; row layers: A [r, in / tp], B [out, r]
    per_layer = 3 * r * h + (q + 2 * kv) // tp * 3 * r + r * q // tp + h * r + 2 * r * h + 2 * f // tp * 2 * r \
        + r * f // tp + h * r
    adapters = layers * per_layer
    gib = 2 ** 30
    components = s["plan"]["memory"]["components_gib"]
    assert components["gradients"] == pytest.approx(adapters * 4 / gib, abs=0.01)  # FP32 gradient buffer
    # master weights and Adam moments of the adapters only, sharded over DP = 4 (distributed optimizer)
    assert components["optimizer_state"] == pytest.approx(adapters * 8 / 4 / gib, abs=0.01)
    assert s["plan"]["memory"]["peak"]["gib"] < 80 and s["plan"]["engine"]["dtype"] == "float16"


def test_bad_layout_fails_clearly(tmp_path):
    proc = _run(["bash", "examples/grpo_qwen3_8b_fp16.sh", _hf_dir(tmp_path, DENSE), "--tp", "3"],
                env=dict(DRY_RUN="1", HF_DIR=""))
    assert proc.returncode != 0
    assert "tp=3 does not divide num_attention_heads=32" in proc.stderr
    assert "DRY-RUN" not in proc.stdout


def test_bad_rl_flag_names_the_flag(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import grpo_train

    args = grpo_train.build_parser().parse_args(["--hf-dir", str(tmp_path), "--rl-clip-low", "-1"])
    with pytest.raises(ValueError, match="--rl-clip-low"):
        grpo_train.build_config(args)
    args = grpo_train.build_parser().parse_args(["--hf-dir", str(tmp_path), "--group-size", "4"])
    assert grpo_train.build_config(args).rl.group_size == 4
    args = grpo_train.build_parser().parse_args(["--hf-dir", str(tmp_path)])
    args.rollout_gpu_memory_utilization = 1.5  # the flag refuses it when parsed; the config too
    with pytest.raises(ValueError, match=r"^--rollout-gpu-memory-utilization: RolloutConfig.gpu_memory_utilization"
                                         r"=1.5: must be in \(0, 1\]"):
        grpo_train.build_config(args)
    args = grpo_train.build_parser().parse_args(["--hf-dir", str(tmp_path), "--rollout-sleep-level", "1"])
    assert grpo_train.build_config(args).rollout.sleep_level == 1


def test_help_texts():
    proc = _run([PY, "examples/megatron_lm_extension.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--rl-correction" in proc.stdout
    proc = _run([PY, "examples/grpo_train.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    for flag in ("--rl-loss", "--rl-correction", "--rl-agg", "--rl-kl-coef", "--dry-run", "--hf-dir", "--ep"):
        assert flag in proc.stdout
    proc = _run([PY, "examples/grpo_cpu_demo.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--ep", "--rollout-tp", "--precision"):
        assert flag in proc.stdout


def test_embedded_model_family_is_checked(tmp_path):
    from megatron_rlfp16.trainer.embedded import embedded_setup

    with pytest.raises(ValueError, match=r"family='gpt2'; valid: llama, qwen3_moe"):
        embedded_setup(str(tmp_path), family="gpt2")
    assert not list(tmp_path.iterdir())  # nothing written for a bad request


@pytest.mark.parametrize("script", ["export_bench", "logprob_bench", "guard_bench", "refit_bench", "lora_capacity"])
def test_bench_scripts_show_help(script):
    proc = _run([PY, f"bench/{script}.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout
