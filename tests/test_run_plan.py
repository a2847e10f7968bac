"""The run plan and the defects it removed, each with a test that failed before.

- one field, one home: no config field is defined twice;
- an advantage estimator added with ``register_advantage_estimator`` is accepted everywhere;
- ``validate()`` runs once, after overrides, not at construction nor on every accessor;
- the batch arithmetic is checked before anything is built (micro-batches, not samples);
- the DDP the trainer builds gets the precision's NaN check (it used to keep only one field);
- FP16 MoE with EP=2: one loss scale for dense and expert gradients;
- the loss Megatron backpropagates has the gradient magnitude of a mean loss, not N times it.
"""
import dataclasses
import math
import uuid

import pathlib

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks




def _config(hf_dir="unused", **kwargs):
    from megatron_rlfp16.trainer import TrainerConfig

    return TrainerConfig(hf_dir=hf_dir, **kwargs)


# -- configs --------------------------------------------------------------------------------------


def test_no_config_field_is_defined_twice():
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig

    nested = {"parallel", "rollout", "run", "rl", "precision", "loss"}
    # The same name for two different settings, each set on its own: the engine's TP next to the
    # trainer's, and the engine's sampling seed (None: the run's seed) next to the run's.
    distinct = {("tp", "RolloutConfig"), ("seed", "RolloutConfig")}
    seen = {}
    for cls in (TrainerConfig, RunConfig, RLConfig, PolicyLossConfig, ParallelConfig, RolloutConfig,
                PrecisionConfig):
        for f in dataclasses.fields(cls):
            if f.name in nested and cls in (TrainerConfig, RLConfig) or (f.name, cls.__name__) in distinct:
                continue
            assert f.name not in seen, f"{f.name} is defined in {seen.get(f.name)} and {cls.__name__}"
            seen[f.name] = cls.__name__


def test_old_spellings_keep_working_and_warn_once():
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.trainer import RunConfig

    loss = PolicyLossConfig(loss="pg")
    with pytest.warns(DeprecationWarning):
        run = RunConfig(group_size=4, temperature=0.7, advantage_estimator="rloo")
        config = _config(tp=2, ep=1, rollout_tp=1, rollout_sleep_level=1, loss=loss, run=run)
    assert (config.parallel.tp, config.rollout.tp, config.rollout.sleep_level) == (2, 1, 1)
    assert (config.rl.group_size, config.rl.temperature, config.rl.advantage_estimator) == (4, 0.7, "rloo")
    assert config.rl.loss is loss
    assert config.tp == 2 and config.run.group_size == 4 and config.loss is loss


def test_a_registered_advantage_estimator_passes_validation_and_the_cli(tmp_path):
    import os
    import sys

    from megatron_rlfp16.losses import register_advantage_estimator
    from megatron_rlfp16.megatron.args import RLConfig

    name = f"test_est_{uuid.uuid4().hex[:8]}"

    @register_advantage_estimator(name)
    def _estimator(rewards, group_size):
        return rewards - rewards.mean()

    assert _config(rl=RLConfig(advantage_estimator=name)).validate().rl.advantage_estimator == name
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    import grpo_train

    args = grpo_train.build_parser().parse_args(
        ["--hf-dir", str(tmp_path), "--rl-advantage-estimator", name])
    assert grpo_train.build_config(args).rl.advantage_estimator == name
    with pytest.raises(ValueError, match="advantage_estimator='nope' is invalid; valid: .*grpo"):
        _config(rl=RLConfig(advantage_estimator="nope")).validate()


def test_validate_runs_once_after_the_overrides(monkeypatch):
    from megatron_rlfp16.precision import PrecisionConfig

    config = PrecisionConfig(trainer="fp8")  # construction does not validate
    config.trainer = "fp16"                  # ... so an override can fix a field
    calls = []
    original = PrecisionConfig._validate_loss_scaling
    monkeypatch.setattr(PrecisionConfig, "_validate_loss_scaling",
                        lambda self: (calls.append(1), original(self))[1])
    config.validate()
    for _ in range(3):
        config.transformer_overrides(), config.ddp_kwargs(), config.optimizer_kwargs(), config.vllm_kwargs()
    assert len(calls) == 1
    config.hysteresis = 0  # a change after validate() is checked before the next use
    with pytest.raises(ValueError, match="hysteresis=0 is invalid"):
        config.ddp_kwargs()


# -- the plan -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    return make_tiny_model("llama", str(tmp_path_factory.mktemp("plan_llama")), seed=0)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    return make_tiny_model("qwen3_moe", str(tmp_path_factory.mktemp("plan_moe")), seed=0)


def test_plan_resolves_every_consumer_from_one_precision(llama_dir, moe_dir):
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig

    plan = resolve_plan(_config(llama_dir, precision=PrecisionConfig(trainer="bf16")), world_size=2)
    assert plan.trainer_dtype == torch.bfloat16 and plan.export_dtype == torch.bfloat16
    assert plan.engine_kwargs["dtype"] == "bfloat16" and plan.transformer_overrides["bf16"] is True
    # BF16 has no loss scaler: DDP's NaN check is what stops a NaN update.
    assert plan.ddp["check_for_nan_in_grad"] is True and plan.ddp["grad_reduce_in_fp32"] is True
    assert plan.data_parallel == 2 and plan.rollout.tp == 1 and plan.seq_multiple == 1
    fp16 = resolve_plan(_config(llama_dir), world_size=2)
    assert fp16.ddp["check_for_nan_in_grad"] is False  # dynamic scaling: an overflow skips the step
    moe = resolve_plan(_config(moe_dir, parallel=ParallelConfig(tp=2)), world_size=2)
    assert moe.sequence_parallel and moe.seq_multiple == 2
    described = moe.describe()
    # Expert TP stays tp without expert parallelism: Megatron reduces expert gradients over the
    # expert-data-parallel ranks only when ep > 1 (etp=1 at tp=2, ep=1 left each TP rank a partial
    # expert gradient: test_routing_replay's gradient check found it). With ep > 1 it is 1.
    assert described["layout"] == dict(tp=2, pp=1, ep=1, etp=2, dp=1, rollout_tp=2)
    with pytest.raises(ValueError, match=r"ParallelConfig.etp=1 with tp=2 and ep=1: .* valid: etp=tp \(2\)"):
        resolve_plan(_config(moe_dir, parallel=ParallelConfig(tp=2, etp=1)), world_size=2)
    folded = resolve_plan(_config(moe_dir, parallel=ParallelConfig(tp=2, ep=2)), world_size=4)
    assert folded.parallel.etp == 1
    explicit = resolve_plan(_config(moe_dir, parallel=ParallelConfig(tp=2, ep=2, etp=2)), world_size=4)
    assert explicit.parallel.etp == 2
    assert resolve_plan(_config(llama_dir, parallel=ParallelConfig(tp=2)), world_size=2).parallel.etp == 2


@pytest.mark.parametrize("world,run,message", [
    (16, dict(prompts_per_step=3, micro_batch_size=1),
     r"prompts_per_step=3 x RLConfig.group_size=8 = 24 samples per step do not split over 16 data-parallel"),
    # The old up-front check divided samples by updates_per_step: 4 x 2 = 8 samples passed, then the
    # trainer crashed after the warm start on 1 micro-batch per rank that 2 updates cannot share.
    (2, dict(prompts_per_step=4, micro_batch_size=32), r"micro_batch_size=32 does not divide the 16 samples per "
                                                       r"data-parallel rank"),
    (2, dict(prompts_per_step=1, micro_batch_size=4, updates_per_step=2),
     r"updates_per_step=2 does not divide the 1 micro-batches per data-parallel rank"),
    (2, dict(max_new_tokens=512), r"max_new_tokens=512 leaves no room for a prompt"),
])
def test_plan_refuses_batch_arithmetic_that_would_crash_mid_step(llama_dir, world, run, message):
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.trainer import RunConfig

    # RLConfig's group size is 8.
    with pytest.raises(ValueError, match=message):
        resolve_plan(_config(llama_dir, run=RunConfig(**run)), world_size=world)


def test_plan_refuses_removal_without_pi_old(llama_dir):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import RLConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.trainer import RunConfig

    loss = PolicyLossConfig(loss="pg", correction="seq_mis", rejection_mode="remove")
    with pytest.raises(ValueError, match=r"rejection_mode='remove' decides on π_old, which loss='pg' has only "
                                         r"with RunConfig.recompute_old_logprobs=True"):
        resolve_plan(_config(llama_dir, rl=RLConfig(loss=loss), run=RunConfig(recompute_old_logprobs=False)),
                     world_size=2)
    resolve_plan(_config(llama_dir, rl=RLConfig(loss=loss)), world_size=2)  # π_old recomputed: fine


def test_plan_resolves_lora(llama_dir, moe_dir):
    from megatron_rlfp16.lora import LORA_TARGETS, LoraConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.rollout import RolloutConfig

    plan = resolve_plan(_config(llama_dir, lora=LoraConfig(rank=12)), world_size=2)
    assert plan.lora.sync == "adapter" and plan.lora.target_modules == LORA_TARGETS
    # the smallest of vLLM's limits that holds rank 12; the engine keeps its base through training
    assert plan.rollout.max_lora_rank == 16 and plan.rollout.sleep_level == 1
    assert plan.describe()["lora"]["engine_max_lora_rank"] == 16
    full = resolve_plan(_config(llama_dir), world_size=2)
    assert full.rollout.max_lora_rank is None and full.describe()["lora"] is None
    # only the adapters have gradients, master weights and optimizer state
    for key in ("gradients", "master_weights", "optimizer_state"):
        assert plan.memory.components[key] < full.memory.components[key] / 4
    assert plan.memory.components["weights"] > full.memory.components["weights"]
    merged = resolve_plan(_config(llama_dir, lora=LoraConfig(rank=12, sync="merged")), world_size=2)
    assert merged.rollout.max_lora_rank is None and merged.rollout.sleep_level == 2
    moe = resolve_plan(_config(moe_dir, lora=LoraConfig(rank=8)), world_size=2)
    assert moe.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")  # MoE default: attention
    with pytest.raises(ValueError, match=r"LoraConfig.target_modules: gate_proj are MoE experts in qwen3_moe, and "
                                         r"LoRA on experts is not supported; valid for qwen3_moe: q_proj, k_proj, "
                                         r"v_proj, o_proj"):
        resolve_plan(_config(moe_dir, lora=LoraConfig(rank=8, target_modules=("q_proj", "gate_proj"))), world_size=2)
    with pytest.raises(ValueError, match=r"LoraConfig.rank=32 is above RolloutConfig.max_lora_rank=16, the largest "
                                         r"adapter the engine would serve; valid: a rank <= 16, or max_lora_rank None "
                                         r"\(the plan picks 32\)"):
        resolve_plan(_config(llama_dir, lora=LoraConfig(rank=32), rollout=RolloutConfig(max_lora_rank=16)),
                     world_size=2)
    with pytest.raises(ValueError, match=r"LoRA rank 600 is above the largest vLLM serves \(512\)"):
        resolve_plan(_config(llama_dir, lora=LoraConfig(rank=600)), world_size=2)
    assert resolve_plan(_config(llama_dir, lora=LoraConfig(rank=600, sync="merged")), world_size=2).lora.rank == 600


def test_plan_resolves_the_ppo_critic(llama_dir, moe_dir, tmp_path):
    from megatron_rlfp16.lora import LoraConfig
    from megatron_rlfp16.megatron import RLConfig
    from megatron_rlfp16.megatron.critic import CriticConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.plan.memory import params_per_rank
    from megatron_rlfp16.testing.tiny import make_tiny_model
    from megatron_rlfp16.trainer import RunConfig

    ppo = RLConfig(advantage_estimator="gae", group_size=4, gamma=0.99, lam=0.95)
    plan = resolve_plan(_config(llama_dir, rl=ppo, run=RunConfig(lr=2e-5)), world_size=2)
    assert plan.critic.hf_dir == llama_dir and plan.critic.optimizer["lr"] == 2e-5
    assert (plan.critic.gamma, plan.critic.lam, plan.critic.value_clip) == (0.99, 0.95, 0.2)
    assert plan.describe()["critic"]["lr"] == 2e-5
    assert resolve_plan(_config(llama_dir), world_size=2).critic is None
    # The critic's state: the policy's parameters less the vocabulary head plus one row, at 2 bytes
    # (FP16 weights) + 4 (FP32 gradients), and 4 (masters) + 8 (Adam) sharded over DP=2 (the
    # distributed optimizer).
    arch = plan.arch
    count = params_per_rank(arch, tp=1, pp=1).total
    critic = count - arch.padded_vocab_size(1) * arch.hidden_size + arch.hidden_size + 1
    assert plan.distributed_optimizer and plan.data_parallel == 2
    assert plan.memory.components["critic_state"] == critic * 6 + int(critic / 2 * 12)
    assert plan.memory.phases["training"]["critic_state"] == plan.memory.components["critic_state"]
    other = resolve_plan(_config(llama_dir, rl=ppo, critic=CriticConfig(lr=1e-4, value_clip=None)), world_size=2)
    assert other.critic.optimizer["lr"] == 1e-4 and other.critic.value_clip is None
    with pytest.raises(ValueError, match=r"advantage_estimator='gae' \(PPO with a critic\) with LoRA is not supported"):
        resolve_plan(_config(llama_dir, rl=ppo, lora=LoraConfig(rank=8)), world_size=2)
    wider = make_tiny_model("llama", str(tmp_path / "wider"), vocab_size=320)
    with pytest.raises(ValueError, match=r"CriticConfig.hf_dir=.* has vocab_size=320, the policy .* 300"):
        resolve_plan(_config(llama_dir, rl=ppo, critic=CriticConfig(hf_dir=wider)), world_size=2)
    with pytest.raises(ValueError, match=r"CriticConfig.warmup_steps=-1 is invalid"):
        _config(llama_dir, critic=CriticConfig(warmup_steps=-1)).validate()
    with pytest.raises(ValueError, match=r"RLConfig.gamma=1.5 is invalid; valid: a number in \[0, 1\]"):
        RLConfig(gamma=1.5).validate()


def test_plan_keeps_a_reference_for_the_kl(llama_dir):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import RLConfig
    from megatron_rlfp16.plan import resolve_plan

    plain = resolve_plan(_config(llama_dir), world_size=2)
    assert not plain.reference and "reference_weights" not in plain.memory.components
    kl = resolve_plan(_config(llama_dir, rl=RLConfig(loss=PolicyLossConfig(kl_coef=0.04))), world_size=2)
    assert kl.reference and kl.describe()["reference"]
    # A frozen copy of the weights, in every phase.
    assert kl.memory.components["reference_weights"] == plain.memory.components["weights"]
    for phase in ("rollout", "training", "refit"):
        assert kl.memory.phases[phase]["reference_weights"] == kl.memory.components["reference_weights"]
    ppo = RLConfig(advantage_estimator="gae", group_size=4, kl_in_reward=0.01)
    assert resolve_plan(_config(llama_dir, rl=ppo), world_size=2).reference
    with pytest.raises(ValueError, match=r"RLConfig.kl_in_reward=0.01 puts the KL into token rewards, which only "
                                         r"the 'gae' estimator uses \(this run: 'grpo'\)"):
        RLConfig(kl_in_reward=0.01).validate()


def test_critic_flags_reach_the_config(tmp_path):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import grpo_train

    args = grpo_train.build_parser().parse_args([
        "--hf-dir", str(tmp_path), "--rl-advantage-estimator", "gae", "--rl-lam", "0.9", "--critic-lr", "3e-5",
        "--critic-value-clip", "0.5", "--critic-warmup-steps", "2", "--critic-hf-dir", "other"])
    config = grpo_train.build_config(args)
    assert (config.rl.advantage_estimator, config.rl.lam) == ("gae", 0.9)
    assert (config.critic.hf_dir, config.critic.lr, config.critic.value_clip, config.critic.warmup_steps) == (
        "other", 3e-5, 0.5, 2)


def test_lora_flags_reach_the_config(tmp_path):
    import argparse

    from megatron_rlfp16.cli import add_lora_args, lora_config_from_args
    from megatron_rlfp16.megatron.args import add_rl_args

    args = add_lora_args(argparse.ArgumentParser()).parse_args(
        ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj, v_proj", "--lora-sync", "merged"])
    config = lora_config_from_args(args)
    assert (config.rank, config.alpha, config.target_modules, config.sync) == (4, 8.0, ("q_proj", "v_proj"), "merged")
    assert not lora_config_from_args(add_rl_args(argparse.ArgumentParser()).parse_args([])).enabled
    args = add_lora_args(argparse.ArgumentParser()).parse_args(["--lora-rank", "4", "--lora-target-modules", "qkv"])
    with pytest.raises(ValueError, match=r"^--lora-target-modules: LoraConfig.target_modules=\['qkv'\]: unknown"):
        lora_config_from_args(args)


# -- the loss convention ----------------------------------------------------------------------------


def test_backpropagated_loss_has_the_gradient_of_a_mean_loss():
    """One micro-batch, one rank: Megatron divides the returned loss by M=1 and DDP by D=1, so
    the backward sees what we return. Its gradient per token must be that of the token-mean loss
    (|A| / N per token for plain PG), not N times it (the per-token convention's N·loss)."""
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.loss_func import global_counts, rl_loss_func

    torch.manual_seed(0)
    b, t = 4, 12
    mask = torch.ones(b, t)
    mask[:, 9:] = 0
    batch = dict(input_ids=torch.zeros(b, t + 1, dtype=torch.long), loss_mask=mask,
                 advantages=torch.tensor([1.0, -1.0, 0.5, 2.0]))
    counts = global_counts([batch])
    logprobs = (-torch.rand(b, t)).requires_grad_()
    batch["old_logprobs"] = batch["rollout_logprobs"] = logprobs.detach().clone()
    outputs = rl_loss_func(batch, logprobs, loss_config=PolicyLossConfig(loss="pg", agg="token-mean"),
                           counts=counts)
    assert len(outputs) == 2  # Megatron's standard (loss, metrics)
    loss, metrics = outputs
    loss.backward()
    n = mask.sum()
    expected = -batch["advantages"][:, None] * mask / n  # d/dlogp of -mean(A * logp)
    torch.testing.assert_close(logprobs.grad, expected)
    num, den = metrics["loss"].tolist()
    assert num / den == pytest.approx(float(loss))


# -- real ranks -------------------------------------------------------------------------------------


def _nan_check_worker(hf_dir):
    from megatron_rlfp16.megatron.train import train_step
    from megatron_rlfp16.plan import build_model, resolve_plan, wrap_model
    from megatron_rlfp16.plan.build import init_runtime
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.trainer import RunConfig
    from megatron_rlfp16.losses import PolicyLossConfig

    plan = resolve_plan(_config(hf_dir, precision=PrecisionConfig(trainer="fp32"),
                                run=RunConfig(prompts_per_step=2, micro_batch_size=16)))
    init_runtime(plan)
    ddp = wrap_model(build_model(plan), plan)
    batch = dict(input_ids=torch.randint(0, 300, (2, 9)), loss_mask=torch.ones(2, 8),
                 advantages=torch.tensor([float("nan"), 1.0]), rollout_logprobs=torch.zeros(2, 8))
    try:
        train_step(ddp, [batch], PolicyLossConfig(loss="pg"), vocab_size=plan.arch.vocab_size)
    except RuntimeError as err:
        return dict(check=ddp.ddp_config.check_for_nan_in_grad, error=str(err))
    return dict(check=ddp.ddp_config.check_for_nan_in_grad, error=None)


@pytest.mark.ranks
def test_the_trainers_ddp_stops_a_nan_gradient_without_a_scaler(llama_dir):
    out = run_on_ranks(_nan_check_worker, 1, llama_dir, timeout=300)[0]
    assert out["check"] is True
    assert out["error"] is not None and "nan" in out["error"].lower(), out


def _second_step_worker(hf_dir):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.train import train_step
    from megatron_rlfp16.plan import build_run, resolve_plan
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.trainer import RunConfig

    plan = resolve_plan(_config(hf_dir, precision=PrecisionConfig(trainer="fp32"),
                                run=RunConfig(prompts_per_step=2, micro_batch_size=8)))
    objects = build_run(plan, engine=False)
    g = torch.Generator().manual_seed(0)
    micro = [dict(input_ids=torch.randint(0, 300, (2, 9), generator=g), loss_mask=torch.ones(2, 8),
                  advantages=torch.tensor([1.0, -0.5]), rollout_logprobs=torch.zeros(2, 8)) for _ in range(2)]
    grads = []
    for optimizer_step in (True, False, False):
        train_step(objects.model, micro, PolicyLossConfig(loss="pg"), vocab_size=plan.arch.vocab_size)
        grads.append([p.main_grad.clone() for p in objects.model.parameters()])
        if optimizer_step:
            objects.stepper.step()
    return [max(float((a - b).abs().max()) for a, b in zip(grads[i], grads[2])) for i in (1,)]


@pytest.mark.ranks
def test_fp32_gradients_after_an_optimizer_step_are_not_counted_twice(llama_dir):
    """Megatron's FP32 optimizer leaves ``param.grad`` aliased to ``main_grad`` after a step; the next
    backward used to accumulate the first micro-batch's gradient into that alias and DDP's hook added
    it again (a resumed FP32 run then had half the uninterrupted run's gradient). Two passes over the
    same micro-batches at the same weights now give the same ``main_grad``."""
    (worst,) = run_on_ranks(_second_step_worker, 1, llama_dir, timeout=300)[0]
    assert worst == 0.0


def _shared_scaler_worker(hf_dir):
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.train import train_step
    from megatron_rlfp16.plan import build_run, resolve_plan
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.precision.scaler import sub_optimizers
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig

    precision = PrecisionConfig(trainer="fp16", initial_loss_scale=1024.0, hysteresis=1)
    plan = resolve_plan(_config(hf_dir, parallel=ParallelConfig(ep=2), precision=precision,
                                run=RunConfig(prompts_per_step=2, micro_batch_size=8)))
    objects = build_run(plan, engine=False)
    subs = sub_optimizers(objects.optimizer)
    torch.manual_seed(1)
    batch = dict(input_ids=torch.randint(0, 300, (2, 9)), loss_mask=torch.ones(2, 8),
                 advantages=torch.tensor([1.0, -1.0]), rollout_logprobs=torch.zeros(2, 8))
    scales = []
    for step in range(3):
        train_step(objects.model, [batch], PolicyLossConfig(loss="pg"), vocab_size=plan.arch.vocab_size)
        if step == 1:  # an overflow in expert gradients only, on this rank's experts
            for name, p in objects.model.module.named_parameters():
                if ".experts." in name:
                    p.main_grad.fill_(float("inf"))
        out = objects.stepper.step()
        scales.append(dict(overflow=out["overflow"], chained=float(objects.optimizer.get_loss_scale()),
                           subs=[float(s.grad_scaler.scale) for s in subs]))
    return dict(num_subs=len(subs), scales=scales)


@pytest.mark.ranks
def test_fp16_moe_keeps_one_loss_scale_for_dense_and_expert_gradients(moe_dir):
    for out in run_on_ranks(_shared_scaler_worker, 2, moe_dir, timeout=600):
        assert out["num_subs"] == 2  # Megatron chains a dense and an expert optimizer under EP
        assert [s["overflow"] for s in out["scales"]] == [0.0, 1.0, 0.0]
        for s in out["scales"]:
            assert s["subs"] == [s["chained"]] * 2, s  # every sub-optimizer unscales by the same scale
        # hysteresis 1: the expert-only overflow backs off the one scale that all gradients use
        assert [s["chained"] for s in out["scales"]] == [1024.0, 512.0, 512.0]
        assert all(math.isfinite(s["chained"]) for s in out["scales"])
