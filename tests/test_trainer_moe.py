"""The RL loop on an MoE model: Qwen3-MoE trained with expert parallelism (EP=2, so data parallel 2)
beside two independent rollout engines (rollout TP=1 on each rank), in FP16, replaying the engines'
routes in every trainer forward (R3, ``RLConfig.routing_replay``). The trainer refits the
engines before the first rollout and after every step, so each step's mismatch metric is a check of
the MoE weight sync: stale or mis-laid-out experts put prob_diff_mean near 6e-2 here, FP16 rounding
about 2e-5."""
import pytest
import json
import math

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.vllm

def moe_job(out_dir):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.trainer import RunConfig, TaskSource, Trainer, TrainerConfig, warm_start
    from megatron_rlfp16.trainer.embedded import embedded_setup

    init_runtime(ParallelConfig(tp=1, ep=2))
    task, tokenizer, hf_dir = embedded_setup(out_dir, family="qwen3_moe")
    config = TrainerConfig(
        hf_dir=hf_dir, out_dir=out_dir, parallel=ParallelConfig(tp=1, ep=2), rollout=RolloutConfig(tp=1),
        tensorboard=False, progress=False,
        run=RunConfig(steps=3, prompts_per_step=4, max_new_tokens=5, micro_batch_size=4,
                      updates_per_step=2, lr=5e-4, save_every=0),
        rl=RLConfig(loss=PolicyLossConfig(loss="ppo_clip", correction="token_tis"), group_size=4,
                    routing_replay="r3"),
        precision=PrecisionConfig(trainer="fp16", initial_loss_scale=256.0),
    )
    trainer = Trainer(config, TaskSource(task, tokenizer))
    warm_start(trainer, steps=40, batch_size=32, lr=1e-3)
    trainer.fit()
    trainer.close()
    return trainer.step


def test_moe_rl_steps_keep_engine_and_trainer_in_sync(tmp_path):
    assert run_on_ranks(moe_job, 2, str(tmp_path), timeout=900) == [3, 3]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["mismatch/prob_diff_mean"] < 1e-3, r
        # every step measures the routers against the engine's routes (and replays them: R3)
        assert 0.9 < r["router/agreement"] <= 1.0 and 0.0 <= r["router/tokens_disagree"] < 0.2, r
        assert r["mismatch/ratio_max"] < 1.1, r
        assert math.isfinite(r["loss"]) and r["time_weight_sync"] > 0
        assert 0.0 <= r["reward"] <= 1.0
    # The RL updates really moved the weights the engines then had to take.
    assert all(r["grad_norm"] > 0 and r["skipped_steps"] == rows[0]["skipped_steps"] for r in rows)
