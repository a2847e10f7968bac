"""``RunPlan`` and ``resolve_plan``: every setting of a run decided in one place, before anything is built."""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Mapping, Optional

import torch

from megatron_rlfp16.lora.config import LoraConfig
from megatron_rlfp16.models import ModelArch, check_layout, parse_hf_config, read_config_json
from megatron_rlfp16.models.builder import default_expert_tp, sequence_multiple, uses_sequence_parallel
from megatron_rlfp16.plan.memory import (
    MemoryPlan, device_memory_bytes, plan_memory, resolved_attention, resolved_offload, with_offload_optimizer,
)
from megatron_rlfp16.precision import Precision, PrecisionConfig
from megatron_rlfp16.rollout.engine import LORA_FAMILIES, RolloutConfig, engine_lora_rank
from megatron_rlfp16.runtime import ParallelConfig

@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticPlan:
    """PPO's value model, resolved (``TrainerConfig.critic`` with ``rl.advantage_estimator="gae"``)."""

    hf_dir: str
    arch: ModelArch
    optimizer: Mapping[str, Any]
    """``OptimizerConfig`` fields besides precision: the policy's with the critic's lr."""
    value_clip: Optional[float]
    warmup_steps: int
    gamma: float
    lam: float


PROMPT_ROOM = 256
"""Tokens the engine keeps for the prompt when ``RolloutConfig.max_model_len`` is not given."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunPlan:
    """A fully resolved run; what every stage reads. Build one with :func:`resolve_plan`."""

    hf_dir: str
    hf_config: Mapping[str, Any]
    arch: ModelArch
    world_size: int
    local_world_size: int
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``); a rollout TP group stays inside one."""
    parallel: ParallelConfig
    """Megatron's layout with ``etp`` filled in."""
    data_parallel: int
    precision: PrecisionConfig
    """Validated; the source of every dtype below."""
    trainer_dtype: torch.dtype
    transformer_overrides: Mapping[str, Any]
    """``TransformerConfig`` fields the precision and the recompute setting set."""
    sequence_parallel: bool
    seq_multiple: int
    """Every sequence fed to the model is padded to a multiple of this (``models.sequence_multiple``)."""
    ddp: Mapping[str, Any]
    """``DistributedDataParallelConfig`` fields: the precision's ``ddp_kwargs()`` in full plus layout."""
    optimizer: Mapping[str, Any]
    """``OptimizerConfig`` fields besides precision (lr, weight decay, distributed optimizer)."""
    rollout: RolloutConfig
    """With tp, seed and max_model_len resolved."""
    engine_kwargs: Mapping[str, Any]
    """vLLM engine arguments of the precision (``PrecisionConfig.vllm_kwargs()``)."""
    export_dtype: torch.dtype
    """What the weight sync casts to: the rollout's precision."""
    sync_bucket_bytes: int
    samples_per_step: int
    samples_per_rank: int
    micro_batch_size: int
    micro_batches_per_rank: int
    updates_per_step: int
    micro_batches_per_update: int
    group_size: int
    temperature: float
    rl_loss: Any
    """The run's ``PolicyLossConfig``."""
    distributed_optimizer: bool
    """Master weights and Adam moments sharded over data parallelism (on by default when dp > 1)."""
    recompute: str
    attention: str
    """The attention kernel the memory plan assumes ("fused" or "unfused")."""
    offload: bool
    """The trainer's state leaves the device while the engine samples (``runtime.offload``)."""
    offload_optimizer: bool
    """With ``offload``: master weights and optimizer state in host memory except during each
    optimizer step (``MemoryConfig.offload_optimizer``)."""
    memory: MemoryPlan
    """Bytes per rank and phase (``plan.memory``); checked against the device before anything is built."""
    routing_replay: str = "none"
    """MoE routing replay ("none", "r2", "r3"; ``megatron_rlfp16.routing``)."""
    engine_gpu_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """vLLM engine arguments added on a GPU only: for FP16 MoE rollouts ``moe_backend="triton"``,
    which keeps vLLM off FlashInfer's MoE kernels (its first choice for unquantized MoE on most
    GPUs; reported to corrupt FP16 outputs, docs/fp16.md). On CPU vLLM's own CPU MoE kernel runs."""
    critic: Optional[CriticPlan] = None
    """PPO's value model (``rl.advantage_estimator="gae"``), else None."""
    reference: bool = False
    """A frozen reference policy (the ``hf_dir`` checkpoint, adapters off in a LoRA run) is kept for
    the KL penalty (``PolicyLossConfig.kl_coef`` or ``RLConfig.kl_in_reward``)."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """The adapters (``rank`` 0: full fine-tuning), with ``sync`` resolved: "adapter" (only the
    adapters go to the engine, which serves them as a LoRA) where vLLM serves LoRA for the family,
    else "merged" (``W + scale · B · A`` through the full refit)."""

    def describe(self) -> dict:
        """A JSON-able summary (printed by dry runs, stored beside checkpoints)."""
        p = self.parallel
        return dict(
            family=self.arch.family, world_size=self.world_size,
            layout=dict(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, dp=self.data_parallel, rollout_tp=self.rollout.tp),
            precision=dict(trainer=self.precision.trainer.value, rollout=self.precision.rollout_precision.value,
                           dynamic_loss_scaling=self.precision.dynamic_loss_scaling),
            sequence_parallel=self.sequence_parallel, seq_multiple=self.seq_multiple,
            ddp={k: v for k, v in self.ddp.items()},
            batch=dict(samples_per_step=self.samples_per_step, samples_per_rank=self.samples_per_rank,
                       micro_batch_size=self.micro_batch_size, micro_batches_per_rank=self.micro_batches_per_rank,
                       updates_per_step=self.updates_per_step),
            engine=dict(tp=self.rollout.tp, max_model_len=self.rollout.max_model_len, seed=self.rollout.seed,
                        dtype=self.engine_kwargs.get("dtype"), load_format=self.rollout.load_format),
            export_dtype=Precision.parse(self.export_dtype).value, sync_bucket_bytes=self.sync_bucket_bytes,
            distributed_optimizer=self.distributed_optimizer, recompute=self.recompute, attention=self.attention,
            offload=self.offload, offload_optimizer=self.offload_optimizer, memory=self.memory.describe(),
            routing=dict(replay=self.routing_replay, engine_routes=bool(self.rollout.return_routes)),
            engine_gpu_kwargs=dict(self.engine_gpu_kwargs),
            reference=self.reference,
            critic=dict(hf_dir=self.critic.hf_dir, lr=self.critic.optimizer["lr"], value_clip=self.critic.value_clip,
                        warmup_steps=self.critic.warmup_steps, gamma=self.critic.gamma, lam=self.critic.lam)
            if self.critic else None,
            lora=dict(rank=self.lora.rank, alpha=self.lora.resolved_alpha, dropout=self.lora.dropout,
                      target_modules=list(self.lora.target_modules), sync=self.lora.sync,
                      engine_max_lora_rank=self.rollout.max_lora_rank) if self.lora.enabled else None,
        )


def _world_size(given: Optional[int]) -> int:
    if given is not None:
        return given
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _batch_arithmetic(config, dp: int) -> dict:
    run, rl = config.run, config.rl
    samples = run.prompts_per_step * rl.group_size
    if samples % dp:
        raise ValueError(
            f"RunConfig.prompts_per_step={run.prompts_per_step} x RLConfig.group_size={rl.group_size} = "
            f"{samples} samples per step do not split over {dp} data-parallel ranks; valid: a product "
            f"divisible by {dp}"
        )
    per_rank = samples // dp
    if per_rank % run.micro_batch_size:
        raise ValueError(
            f"RunConfig.micro_batch_size={run.micro_batch_size} does not divide the {per_rank} samples per "
            f"data-parallel rank (prompts_per_step x group_size / dp = {samples} / {dp}); valid: a divisor "
            f"of {per_rank}"
        )
    micro = per_rank // run.micro_batch_size
    if micro % run.updates_per_step:
        raise ValueError(
            f"RunConfig.updates_per_step={run.updates_per_step} does not divide the {micro} micro-batches "
            f"per data-parallel rank ({per_rank} samples / micro_batch_size {run.micro_batch_size}); "
            f"valid: a divisor of {micro}"
        )
    return dict(samples_per_step=samples, samples_per_rank=per_rank, micro_batch_size=run.micro_batch_size,
                micro_batches_per_rank=micro, updates_per_step=run.updates_per_step,
                micro_batches_per_update=micro // run.updates_per_step)


def resolve_plan(config, *, world_size: Optional[int] = None,
                 hf_config: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Validates ``config`` (a ``trainer.TrainerConfig``) once and resolves it into a ``RunPlan``.

    ``world_size`` defaults to torch.distributed's, else ``$WORLD_SIZE``, else 1; ``hf_config``
    defaults to ``config.hf_dir/config.json``. Every error names the field, its value and what is
    valid; nothing is built or allocated here."""
    config.validate()
    cfg = dict(hf_config) if hf_config is not None else read_config_json(config.hf_dir)
    arch = parse_hf_config(cfg)
    world = _world_size(world_size)
    etp = config.parallel.etp or default_expert_tp(arch, config.parallel.tp, config.parallel.ep)
    parallel = dataclasses.replace(config.parallel, etp=etp)
    check_layout(arch, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep)  # the model's constraints first
    parallel.validate(world)
    dp = parallel.dp(world)
    precision = config.precision
    rollout = config.rollout.resolved(
        tp=parallel.tp, seed=config.run.seed,
        load_format="dummy",  # the trainer refits the engine before its first rollout
        max_model_len=min(arch.max_position_embeddings, PROMPT_ROOM + config.run.max_new_tokens),
    )
    if world % rollout.tp:
        raise ValueError(f"RolloutConfig.tp={rollout.tp} does not divide the world size {world}; "
                         f"valid: a divisor of {world}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world_size is None else world
    if local % rollout.tp:
        raise ValueError(
            f"RolloutConfig.tp={rollout.tp} does not divide the {local} processes per node "
            f"(LOCAL_WORLD_SIZE): each colocated engine's TP group must stay inside one node; valid: a "
            f"divisor of {local}"
        )
    routing_replay = _check_routing(config, arch, rollout)
    rollout = dataclasses.replace(rollout, return_routes=arch.is_moe if rollout.return_routes is None
                                  else rollout.return_routes)
    lora = _resolve_lora(config.lora, arch)
    if lora.enabled and lora.sync == "adapter":
        # The engine keeps its base weights through the training phase (sleep level 1): only the
        # adapters are written after a step, and a level-2 sleep would discard the base.
        rollout = dataclasses.replace(rollout, max_lora_rank=_engine_lora_limit(lora, rollout), sleep_level=1)
    _check_rejection(config)
    critic = _resolve_critic(config, arch, parallel)
    reference = config.rl.loss.kl_coef != 0 or config.rl.kl_in_reward > 0
    if config.rl.overlong_buffer > config.run.max_new_tokens:
        raise ValueError(f"RLConfig.overlong_buffer={config.rl.overlong_buffer} is longer than the responses "
                         f"(RunConfig.max_new_tokens={config.run.max_new_tokens}); valid: 0 to "
                         f"{config.run.max_new_tokens}")
    if config.run.max_new_tokens >= rollout.max_model_len:
        raise ValueError(
            f"RunConfig.max_new_tokens={config.run.max_new_tokens} leaves no room for a prompt within "
            f"RolloutConfig.max_model_len={rollout.max_model_len}; valid: below {rollout.max_model_len}"
        )
    memory_config = config.memory
    distributed = dp > 1 if memory_config.distributed_optimizer is None else memory_config.distributed_optimizer
    ddp = dict(precision.ddp_kwargs(), use_distributed_optimizer=distributed)
    optimizer = dict(lr=config.run.lr, weight_decay=config.run.weight_decay, use_distributed_optimizer=distributed)
    batch = _batch_arithmetic(config, dp)
    attention = resolved_attention(memory_config.attention)
    seq = -(-rollout.max_model_len // sequence_multiple(arch, parallel.tp)) * sequence_multiple(arch, parallel.tp)
    memory = with_offload_optimizer(plan_memory(
        arch, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, etp=parallel.etp, dp=dp, world_size=world,
        dtype_bytes=precision.trainer.torch_dtype.itemsize, fp32_grads=bool(ddp.get("grad_reduce_in_fp32")),
        fp32_logits=precision.fp32_logits, distributed_optimizer=distributed,
        micro_batch_size=batch["micro_batch_size"], seq_length=seq, micro_batches=batch["micro_batches_per_update"],
        sequence_parallel=uses_sequence_parallel(arch, parallel.tp), recompute=memory_config.recompute,
        attention=attention, engine_fraction=rollout.gpu_memory_utilization, rollout_tp=rollout.tp,
        rollout_dtype_bytes=precision.rollout_precision.torch_dtype.itemsize,
        device_bytes=device_memory_bytes(memory_config), bucket_bytes=config.run.sync_bucket_mb << 20,
        offload=resolved_offload(memory_config),
        lora_rank=lora.rank, lora_targets=tuple(lora.target_modules) if lora.enabled else (),
        critic_arch=critic.arch if critic else None, reference=reference,
    ), memory_config.offload_optimizer)
    memory.check()  # before anything is allocated
    overrides = dict(precision.transformer_overrides(), **memory_config.recompute_overrides())
    return RunPlan(
        hf_dir=config.hf_dir, hf_config=types.MappingProxyType(cfg), arch=arch, world_size=world,
        local_world_size=local,
        parallel=parallel, data_parallel=dp, precision=precision,
        trainer_dtype=precision.trainer.torch_dtype,
        transformer_overrides=types.MappingProxyType(overrides),
        sequence_parallel=uses_sequence_parallel(arch, parallel.tp),
        seq_multiple=sequence_multiple(arch, parallel.tp),
        ddp=types.MappingProxyType(ddp), optimizer=types.MappingProxyType(optimizer),
        rollout=rollout, engine_kwargs=types.MappingProxyType(precision.vllm_kwargs()),
        export_dtype=precision.rollout_precision.torch_dtype,
        sync_bucket_bytes=config.run.sync_bucket_mb << 20,
        group_size=config.rl.group_size, temperature=config.rl.temperature, rl_loss=config.rl.loss,
        distributed_optimizer=distributed, recompute=memory_config.recompute, attention=attention,
        offload=resolved_offload(memory_config), offload_optimizer=memory.settings["offload_optimizer"],
        memory=memory,
        routing_replay=routing_replay, lora=lora, reference=reference,
        critic=dataclasses.replace(critic, optimizer=types.MappingProxyType(dict(optimizer, lr=critic.optimizer["lr"])))
        if critic else None,
        engine_gpu_kwargs=types.MappingProxyType(_engine_gpu_kwargs(arch, precision)),
        **batch,
    )


def _resolve_critic(config, arch: ModelArch, parallel: ParallelConfig) -> Optional[CriticPlan]:
    """PPO's critic when the estimator is "gae": its checkpoint must share the policy's vocabulary
    (it reads the same token ids) and fit the layout."""
    if config.rl.advantage_estimator != "gae":
        return None
    critic = config.critic
    if config.lora.enabled:
        raise ValueError("RLConfig.advantage_estimator='gae' (PPO with a critic) with LoRA is not supported yet; "
                         "valid: LoraConfig.rank=0, or a group estimator (grpo, drgrpo, rloo)")
    hf_dir = critic.hf_dir or config.hf_dir
    critic_arch = arch if hf_dir == config.hf_dir else parse_hf_config(read_config_json(hf_dir))
    if critic_arch.vocab_size != arch.vocab_size:
        raise ValueError(f"CriticConfig.hf_dir={hf_dir!r} has vocab_size={critic_arch.vocab_size}, the policy "
                         f"{config.hf_dir!r} {arch.vocab_size}; valid: a checkpoint with the policy's tokenizer")
    check_layout(critic_arch, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep)
    return CriticPlan(hf_dir=hf_dir, arch=critic_arch, optimizer={"lr": critic.lr or config.run.lr},
                      value_clip=critic.value_clip, warmup_steps=critic.warmup_steps,
                      gamma=config.rl.gamma, lam=config.rl.lam)


def _check_rejection(config) -> None:
    """``rejection_mode="remove"`` decides on π_old; an objective whose proximal policy is sg(πθ)
    ("pg") has π_old only when the trainer recomputes it."""
    from megatron_rlfp16.losses.registry import POLICY_LOSSES

    loss = config.rl.loss
    if (loss.corrected and loss.rejection_mode == "remove" and not config.run.recompute_old_logprobs
            and POLICY_LOSSES.get(loss.loss).proximal == "current"):
        raise ValueError(
            f"PolicyLossConfig.rejection_mode='remove' decides on π_old, which loss={loss.loss!r} has only with "
            "RunConfig.recompute_old_logprobs=True (it is False: bypass); valid: recompute_old_logprobs=True "
            "or rejection_mode='zero'"
        )


def _check_routing(config, arch: ModelArch, rollout: RolloutConfig) -> str:
    mode = config.rl.routing_replay
    if mode == "none":
        return mode
    if not arch.is_moe:
        raise ValueError(f"RLConfig.routing_replay={mode!r}: {arch.family} is a dense model, it has no "
                         "router to replay; valid: 'none'")
    if mode == "r3" and rollout.return_routes is False:
        raise ValueError("RLConfig.routing_replay='r3' replays the rollout engine's routes, but "
                         "RolloutConfig.return_routes=False turns them off; valid: return_routes None or "
                         "True with r3, or routing_replay 'r2' / 'none'")
    return mode


def _resolve_lora(lora: LoraConfig, arch: ModelArch) -> LoraConfig:
    """The run's ``LoraConfig`` checked against the model, with ``sync`` decided."""
    lora.validate(family=arch.family, is_moe=arch.is_moe)
    if not lora.enabled:
        return lora
    serves = arch.family in LORA_FAMILIES
    if lora.sync == "adapter" and not serves:
        raise ValueError(f"LoraConfig.sync='adapter': vLLM serves no LoRA adapters for {arch.family}; valid: "
                         "'merged' (or None, which picks it)")
    return dataclasses.replace(lora, sync=lora.sync or ("adapter" if serves else "merged"),
                               target_modules=lora.targets_for(arch.is_moe))


def _engine_lora_limit(lora: LoraConfig, rollout: RolloutConfig) -> int:
    """The engine's ``max_lora_rank``: the user's, when it holds the adapters, else the smallest vLLM
    limit that does."""
    if rollout.max_lora_rank is None:
        return engine_lora_rank(lora.rank)
    if rollout.max_lora_rank < lora.rank:
        raise ValueError(f"LoraConfig.rank={lora.rank} is above RolloutConfig.max_lora_rank="
                         f"{rollout.max_lora_rank}, the largest adapter the engine would serve; valid: a rank "
                         f"<= {rollout.max_lora_rank}, or max_lora_rank None (the plan picks "
                         f"{engine_lora_rank(lora.rank)})")
    return rollout.max_lora_rank


def _engine_gpu_kwargs(arch: ModelArch, precision: PrecisionConfig) -> dict:
    if arch.is_moe and precision.rollout_precision == Precision.FP16:
        return {"moe_backend": "triton"}
    return {}
