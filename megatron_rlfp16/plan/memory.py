"""The memory plan: bytes per rank for every resident component, per phase, before anything exists.

A colocated run keeps the trainer's state and the rollout engine on the same device. Which of them
are resident depends on the phase:

==========  ==================================================  ==================================
phase       trainer                                             engine
==========  ==================================================  ==================================
rollout     weights, gradients, master weights, optimizer       weights + KV cache (its share of
            state (nothing with ``offload``)                    the device, ``gpu_memory_utilization``)
training    weights, gradients, master weights, optimizer       asleep (released)
            state, activations of the micro-batches in flight
            (with ``offload_optimizer`` no master weights or
            optimizer state: they are in host memory)
optimizer   only with ``offload_optimizer``: weights,           asleep
            gradients, master weights, optimizer state (the
            step; the activations are gone)
refit       weights, gradients, master weights, optimizer       its weights (awake, KV cache still
            state (weights only with ``offload``), one bucket   released)
==========  ==================================================  ==================================

A checkpoint is saved after the refit. Without offload that holds what the refit holds; with it
the engine sleeps first and the save holds weights, master weights and optimizer state, no more
than the training or optimizer phase.

Every component is computed from the HF config and the layout alone (no model is built):

- **weights**: this rank's parameters (the worst pipeline stage: embedding or LM head included) in
  the trainer's dtype. Tensor parallelism splits attention, MLP and the (padded) vocabulary; expert
  parallelism splits the experts and expert tensor parallelism each expert.
- **gradients**: Megatron's DDP keeps one full-size gradient buffer per rank, in FP32 when
  gradients are reduced in FP32 (the FP16/BF16 default), even with the distributed optimizer.
- **master weights**: an FP32 copy for FP16/BF16 (none in FP32); **optimizer state**: Adam's two
  FP32 moments. With the distributed optimizer both are sharded over the data-parallel ranks
  (expert parameters over the expert-data-parallel ranks).
- **activations**: what the forward saves for the backward, per layer and micro-batch, counted from
  the tensors Megatron's layers save (``tests/test_memory_plan.py`` compares the count with the bytes
  Megatron really saves for tiny models): the layer's inputs and norm statistics, q/k/v and the
  attention context, the softmax probabilities of unfused attention (``[b, heads, s, s]``; a fused
  kernel keeps only its output and log-sum-exp), the MLP's intermediate tensors (the routed tokens'
  for MoE), the FP32 logits for the log-probs and, with FP32 logits in a half-precision run, the
  LM head's FP32 weight copy. Selective recompute drops the attention probabilities; full recompute
  keeps each layer's input and output plus one layer's activations at a time. Pipeline stage 0 holds the
  activations of up to ``pp`` micro-batches (1F1B).
- **engine**: vLLM takes ``gpu_memory_utilization`` of the device for its weights and KV cache while
  awake; during the refit only its weights (the full model over the rollout TP, in the rollout dtype).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional, Tuple

GiB = 1 << 30
FP32_BYTES = 4
ADAM_MOMENTS = 2

RECOMPUTE = ("none", "selective", "full")
"""Activation recompute: none; selective (the attention core is recomputed); full (each layer)."""
ATTENTION = ("fused", "unfused")
"""Attention kernels: fused (flash / TE: no ``[b, h, s, s]`` tensors kept) or unfused (Megatron's
local ``DotProductAttention``, what runs without TransformerEngine)."""
PHASES = ("rollout", "training", "optimizer", "refit")
"""The phases a plan may have, in a step's order ("optimizer" only with ``offload_optimizer``)."""
TRAINER_STATE = ("weights", "gradients", "master_weights", "optimizer_state")


class MemoryPlanError(ValueError):
    """A layout that does not fit the device; the message names the largest component and fixes."""


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameters of one rank: ``dense`` (sharded over data parallelism by the distributed
    optimizer) and ``expert`` (sharded over expert data parallelism)."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def params_per_rank(arch, *, tp: int, pp: int, ep: int = 1, etp: Optional[int] = None, stage: int = 0) -> ParamCount:
    """Parameters of one rank of pipeline stage ``stage`` (Megatron's local-spec layout)."""
    etp = etp or tp
    h, hd = arch.hidden_size, arch.head_dim
    vocab = arch.padded_vocab_size(tp) // tp * h
    attn = h * (arch.num_heads + 2 * arch.num_kv_heads) * hd // tp + arch.num_heads * hd * h // tp
    if arch.qkv_bias:
        attn += (arch.num_heads + 2 * arch.num_kv_heads) * hd // tp
    if arch.qk_norm:
        attn += 2 * hd
    dense_layer = attn + 2 * h  # + input and pre-MLP norms
    expert_layer = 0
    if arch.is_moe:
        dense_layer += arch.num_experts * h  # the router, replicated
        expert_layer = arch.num_experts // ep * 3 * h * arch.moe_ffn_hidden_size // etp
    else:
        dense_layer += 3 * h * arch.ffn_hidden_size // tp
    layers = arch.num_layers // pp
    dense = layers * dense_layer
    first, last = stage == 0, stage == pp - 1
    if first:
        dense += vocab
    if last:
        dense += h  # final norm
        if not arch.tie_embeddings or pp > 1:
            dense += vocab  # the LM head (a tied one is a copy on the last stage when pp > 1)
    return ParamCount(dense=dense, expert=layers * expert_layer)


def lora_params_per_rank(arch, *, rank: int, targets, tp: int, pp: int) -> int:
    """Adapter parameters of one rank (``megatron_rlfp16.lora``'s layout): a fused column-parallel
    layer's ``A`` stacks its targeted roles (``[roles · r, in]``, replicated) and its ``B`` covers the
    layer's whole local output (``[out / tp, roles · r]``); a row-parallel layer's ``A`` is split
    by input columns (``[r, in / tp]``), its ``B`` replicated (``[out, r]``). MoE experts carry none."""
    h, hd, r = arch.hidden_size, arch.head_dim, rank
    targets = set(targets)
    per_layer = 0
    qkv = len(targets & {"q_proj", "k_proj", "v_proj"})
    if qkv:
        out = (arch.num_heads + 2 * arch.num_kv_heads) * hd
        per_layer += qkv * r * h + out // tp * qkv * r
    if "o_proj" in targets:
        per_layer += r * arch.num_heads * hd // tp + h * r
    if not arch.is_moe:
        f = arch.ffn_hidden_size
        gate_up = len(targets & {"gate_proj", "up_proj"})
        if gate_up:
            per_layer += gate_up * r * h + 2 * f // tp * gate_up * r
        if "down_proj" in targets:
            per_layer += r * f // tp + h * r
    return arch.num_layers // pp * per_layer


def activation_bytes(arch, *, tp: int, micro_batch_size: int, seq_length: int, dtype_bytes: int,
                     sequence_parallel: bool, recompute: str = "none", attention: str = "unfused",
                     fp32_logits: bool = True, layers: Optional[int] = None, last_stage: bool = True,
                     include_transient: bool = True) -> int:
    """Bytes one micro-batch's forward keeps for the backward on one rank (``layers`` of them, the
    whole model by default), see the module docstring. With full recompute the layer recomputed
    during the backward is included unless ``include_transient`` is False (what the forward alone
    keeps)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}; valid: {list(RECOMPUTE)}")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; valid: {list(ATTENTION)}")
    d, f32 = dtype_bytes, FP32_BYTES
    b, s = micro_batch_size, seq_length
    tokens = b * s
    local = tokens // tp if sequence_parallel else tokens  # tokens whose [., h] tensors this rank holds
    h, hd, nh, nkv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    layers = arch.num_layers if layers is None else layers

    if attention == "unfused":
        # Megatron's local layers (what runs without TransformerEngine), counted from the tensors
        # they save: layer and norm inputs/outputs (the norms compute in FP32) and statistics; q, k
        # and v (k, v repeated to every query head) and the attention context; the softmax
        # probabilities in FP32 and their copy in a half dtype; fc1's output and SwiGLU's tensors.
        per_layer = local * h * (4 * d + 3 * f32) + 2 * local * f32
        per_layer += 4 * tokens * nh * hd * d // tp
        if recompute == "none":
            per_layer += b * nh // tp * s * s * (f32 + (d if d < f32 else 0))
        mlp_factor = 5
    else:
        # TransformerEngine's fused layers (norm fused into the next linear, flash attention): the
        # norm's input and output per block, q/k/v at their own head counts, the output and
        # log-sum-exp; fc1's output and SwiGLU's. An estimate until the GPU smoke check measures it.
        per_layer = local * h * 4 * d + 2 * local * f32
        per_layer += tokens * (2 * nh + 2 * nkv) * hd * d // tp + b * nh // tp * s * f32
        mlp_factor = 3
    if arch.qk_norm:  # per-head norms of q and k: FP32 inputs, outputs and statistics
        per_layer += tokens * (4 * nh + nkv) * hd * f32 // tp
    per_layer += 4 * s * hd * d  # rotary tables
    if arch.is_moe:
        routed = local * arch.moe_topk  # token copies this rank's experts process, on average
        fm = arch.moe_ffn_hidden_size
        per_layer += local * arch.num_experts * f32 * 2  # router logits and probabilities (FP32)
        per_layer += routed * (h + (mlp_factor + 1) * fm) * d  # routed tokens, fc1, SwiGLU, unpermuting
    else:
        per_layer += tokens * mlp_factor * arch.ffn_hidden_size * d // tp

    if recompute == "full":  # each layer's input and output (+ one layer's activations, recomputed
        total = layers * 2 * local * h * d + (per_layer if include_transient else 0)  # in the backward)
    else:
        total = layers * per_layer
    total += local * h * d + s * s  # final norm input, attention mask
    if last_stage:
        vocab = arch.padded_vocab_size(tp) // tp
        total += tokens * vocab * (f32 if fp32_logits else d)  # logits kept for the log-probs
        if fp32_logits and d < f32:
            total += vocab * h * f32  # the LM head weight's FP32 copy
    return total


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank: ``components`` (the worst rank) and what is resident in each phase."""

    components: Mapping[str, int]
    phases: Mapping[str, Mapping[str, int]]
    device_bytes: Optional[int]
    settings: Mapping[str, object]
    inputs: Mapping[str, object] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """The arguments of :func:`plan_memory` that made this plan."""

    def replace(self, **changes) -> "MemoryPlan":
        """The plan of the same run with some of :func:`plan_memory`'s arguments changed (e.g.
        ``device_bytes``, ``offload``)."""
        inputs = dict(self.inputs, **changes)
        if not inputs.get("offload"):
            inputs["offload_optimizer"] = False
        return plan_memory(inputs.pop("arch"), **inputs)

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    def peak(self) -> Tuple[str, int]:
        """``(phase, bytes)`` of the phase that needs the most."""
        return max(((p, self.phase_total(p)) for p in self.phases), key=lambda x: x[1])

    def describe(self) -> dict:
        """GiB per component and per phase (JSON-able)."""
        gib = lambda n: round(n / GiB, 2)  # noqa: E731
        phase, peak = self.peak()
        return dict(
            components_gib={k: gib(v) for k, v in self.components.items()},
            phases_gib={p: dict({k: gib(v) for k, v in self.phases[p].items()}, total=gib(self.phase_total(p)))
                        for p in self.phases},
            peak=dict(phase=phase, gib=gib(peak)),
            device_gib=gib(self.device_bytes) if self.device_bytes else None,
            settings=dict(self.settings),
        )

    def check(self, headroom: float = 0.05) -> None:
        """Raises :class:`MemoryPlanError` when a phase needs more than the device has (less
        ``headroom`` for the CUDA context and fragmentation), naming the largest component there
        and the settings that would make it fit. No device known: nothing to check."""
        if not self.device_bytes:
            return
        engine, weights = self.components.get("engine", 0), self.components.get("engine_weights", 0)
        if engine and weights > 0.9 * engine:
            raise MemoryPlanError(
                f"the rollout engine's weights ({_size(weights)} per GPU at rollout TP "
                f"{self.settings.get('rollout_tp')}) leave no room for a KV cache in its share of the device "
                f"({_size(engine)}); the largest is engine_weights. To fit: a larger --rollout-tp; or a "
                "larger --rollout-gpu-memory-utilization."
            )
        budget = self.device_bytes * (1 - headroom)
        for phase in self.phases:
            need = self.phase_total(phase)
            if need <= budget:
                continue
            parts = self.phases[phase]
            # The engine's share is a setting, not a cost to find: name the trainer's largest part.
            mine = {k: v for k, v in parts.items() if k != "engine"} or parts
            largest = max(mine, key=mine.get)
            gib = _size
            listed = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda x: -x[1]) if v)
            raise MemoryPlanError(
                f"the {phase} phase needs {gib(need)} per GPU, more than the {gib(budget)} usable of "
                f"{gib(self.device_bytes)} ({listed}); the largest is {largest}. "
                f"{_fixes(largest, phase, self.settings)}"
            )


def with_offload_optimizer(plan: MemoryPlan, setting: Optional[bool]) -> MemoryPlan:
    """``plan`` with ``MemoryConfig.offload_optimizer`` applied: True or False as given; None turns
    it on when the plan offloads and does not fit the device otherwise (when it fits neither way,
    the plan with it on, whose error names what is left to change). Check the result."""
    if setting is not None or not plan.settings["offload"]:
        return plan.replace(offload_optimizer=bool(setting) and plan.settings["offload"])
    plain = plan.replace(offload_optimizer=False)
    try:
        plain.check()
        return plain
    except MemoryPlanError:
        return plan.replace(offload_optimizer=True)


def _critic_state_bytes(arch, *, tp, pp, ep, etp, stage, dtype_bytes, fp32_grads, shard_dense, shard_expert) -> int:
    count = params_per_rank(arch, tp=tp, pp=pp, ep=ep, etp=etp, stage=stage)
    dense = count.dense
    if stage == pp - 1:  # the vocabulary head (or its tied copy) becomes one row of values
        dense += arch.hidden_size + 1
        if not arch.tie_embeddings or pp > 1:
            dense -= arch.padded_vocab_size(tp) // tp * arch.hidden_size
    total = dense + count.expert
    master = FP32_BYTES if dtype_bytes < FP32_BYTES else 0
    sharded = dense / shard_dense + count.expert / shard_expert
    return int(total * (dtype_bytes + (FP32_BYTES if fp32_grads else dtype_bytes))
               + sharded * (master + ADAM_MOMENTS * FP32_BYTES))


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _fixes(largest: str, phase: str, settings: Mapping[str, object]) -> str:
    hints = []
    if phase == "rollout" and not settings.get("offload"):
        hints.append("offloading the trainer's state to host memory during rollout (--offload)")
    if largest in ("optimizer_state", "master_weights") and not settings.get("distributed_optimizer"):
        hints.append("the distributed optimizer (shards it over data parallelism; needs dp > 1)")
    if largest in ("optimizer_state", "master_weights", "gradients", "weights", "critic_state"):
        hints.append("more tensor/pipeline/expert parallelism (--tp, --pp, --ep)")
    if largest == "activations":
        if settings.get("attention") == "unfused":
            hints.append("a fused attention kernel (install TransformerEngine)")
        if settings.get("recompute") != "full":
            hints.append("activation recompute (--recompute selective|full)")
        hints.append("a smaller --micro-batch-size or --max-new-tokens")
    if largest == "engine":
        hints.append("a smaller --rollout-gpu-memory-utilization")
    if phase == "training" and not settings.get("offload_optimizer"):
        hints.append("the master weights and optimizer state in host memory outside the optimizer step "
                     "(--offload-optimizer, with --offload)")
    return "To fit: " + "; or ".join(hints) + "." if hints else ""


def plan_memory(arch, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None, dp: int = 1,
                world_size: Optional[int] = None, dtype_bytes: int = 2, fp32_grads: bool = True,
                fp32_logits: bool = True, distributed_optimizer: bool = False, micro_batch_size: int = 1,
                seq_length: int = 1024, micro_batches: int = 1, sequence_parallel: bool = False,
                recompute: str = "none", attention: str = "unfused", engine_fraction: float = 0.0,
                rollout_tp: int = 1, rollout_dtype_bytes: int = 2, device_bytes: Optional[int] = None,
                offload: bool = False, offload_optimizer: bool = False, bucket_bytes: int = 256 << 20, lora_rank: int = 0,
                lora_targets: Tuple[str, ...] = (), critic_arch=None, reference: bool = False) -> MemoryPlan:
    """The :class:`MemoryPlan` of a layout; every argument is a run-plan field (``resolve_plan``
    makes the one of a run: ``RunPlan.memory``). With ``lora_rank`` only the adapters
    (``lora_params_per_rank``) have gradients, master weights and optimizer state; the frozen base
    weights stay in the trainer's dtype. ``critic_arch`` (PPO) adds the critic's weights, gradients,
    master weights and Adam state as ``critic_state`` (its vocabulary head replaced by one row);
    it trains after the policy, so the activations are the larger of the two, the policy's.
    ``reference`` adds a frozen copy of the weights (the KL penalty's reference policy) as
    ``reference_weights``, resident in every phase. ``offload_optimizer`` (needs ``offload``) keeps
    the master weights and optimizer state out of the training phase and adds the optimizer phase."""
    if offload_optimizer and not offload:
        raise ValueError("plan_memory: offload_optimizer=True needs offload=True")
    inputs = {k: v for k, v in locals().items()}
    etp = etp or tp
    world = world_size or tp * pp * dp
    expert_dp = max(1, world // (ep * etp * pp))
    worst = None
    for stage in sorted({0, pp - 1}):
        count = params_per_rank(arch, tp=tp, pp=pp, ep=ep, etp=etp, stage=stage)
        in_flight = min(pp - stage, micro_batches)
        acts = in_flight * activation_bytes(
            arch, tp=tp, micro_batch_size=micro_batch_size, seq_length=seq_length, dtype_bytes=dtype_bytes,
            sequence_parallel=sequence_parallel, recompute=recompute, attention=attention, fp32_logits=fp32_logits,
            layers=arch.num_layers // pp, last_stage=stage == pp - 1)
        master_bytes = FP32_BYTES if dtype_bytes < FP32_BYTES else 0
        shard_dense = dp if distributed_optimizer else 1
        shard_expert = expert_dp if distributed_optimizer else 1
        sharded = count.dense / shard_dense + count.expert / shard_expert
        trainable = count.total
        weights = count.total
        if lora_rank:
            trainable = lora_params_per_rank(arch, rank=lora_rank, targets=lora_targets, tp=tp, pp=pp)
            weights += trainable
            sharded = trainable / shard_dense
        comp = dict(
            weights=weights * dtype_bytes,
            gradients=trainable * (FP32_BYTES if fp32_grads else dtype_bytes),
            master_weights=int(sharded * master_bytes),
            optimizer_state=int(sharded * ADAM_MOMENTS * FP32_BYTES),
            activations=acts,
        )
        if worst is None or sum(comp.values()) > sum(worst.values()):
            worst = comp
    if critic_arch is not None:
        worst["critic_state"] = max(
            _critic_state_bytes(critic_arch, tp=tp, pp=pp, ep=ep, etp=etp, stage=stage, dtype_bytes=dtype_bytes,
                                fp32_grads=fp32_grads, shard_dense=dp if distributed_optimizer else 1,
                                shard_expert=expert_dp if distributed_optimizer else 1)
            for stage in sorted({0, pp - 1}))
    if reference:
        worst["reference_weights"] = max(params_per_rank(arch, tp=tp, pp=pp, ep=ep, etp=etp, stage=stage).total
                                         for stage in sorted({0, pp - 1})) * dtype_bytes
    total_params = params_per_rank(arch, tp=1, pp=1).total
    engine_weights = total_params * rollout_dtype_bytes // rollout_tp
    engine = int(engine_fraction * device_bytes) if device_bytes else 0
    comp = dict(worst, engine=engine, engine_weights=engine_weights)
    state = {k: comp[k] for k in TRAINER_STATE + ("critic_state",) if k in comp}
    optimizer_parts = ("master_weights", "optimizer_state")
    phases = {
        "rollout": dict(engine=engine) if offload else dict(state, engine=engine),
        "training": dict({k: v for k, v in state.items() if not (offload_optimizer and k in optimizer_parts)},
                         activations=comp["activations"]),
    }
    if offload_optimizer:
        phases["optimizer"] = dict(state)
    phases["refit"] = (dict(weights=comp["weights"], engine_weights=engine_weights, bucket=bucket_bytes)
                       if offload else dict(state, engine_weights=engine_weights, bucket=bucket_bytes))
    if reference:  # not offloaded: it is read in every step's log-prob phase
        for parts in phases.values():
            parts["reference_weights"] = comp["reference_weights"]
    settings = dict(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, distributed_optimizer=distributed_optimizer,
                    recompute=recompute, attention=attention, offload=offload,
                    offload_optimizer=offload_optimizer, micro_batch_size=micro_batch_size,
                    seq_length=seq_length, engine_fraction=engine_fraction, rollout_tp=rollout_tp,
                    lora_rank=lora_rank)
    return MemoryPlan(components=types.MappingProxyType(comp),
                      phases=types.MappingProxyType({k: types.MappingProxyType(v) for k, v in phases.items()}),
                      device_bytes=device_bytes, settings=types.MappingProxyType(settings),
                      inputs=types.MappingProxyType(inputs))


@dataclasses.dataclass(kw_only=True)
class MemoryConfig:
    """How the trainer's memory is laid out (``TrainerConfig.memory``; flags of grpo_train.py)."""

    distributed_optimizer: Optional[bool] = None
    """Shard master weights and Adam moments over the data-parallel ranks (Megatron's distributed
    optimizer, ``--distributed-optimizer``). None: on when the data-parallel size is above 1."""
    recompute: str = "none"
    """Activation recompute (``--recompute``): "none", "selective" (the attention core) or "full"
    (every layer, uniformly, one at a time)."""
    attention: str = "auto"
    """The attention kernel the plan assumes (``--attention``): "fused" (TransformerEngine), "unfused"
    (Megatron's local attention, which keeps [b, heads, s, s] probabilities) or "auto" (fused when
    TransformerEngine is installed)."""
    device_memory_gib: Optional[float] = None
    """The memory of one device, for the fit check (``--device-memory-gib``). None: the GPU's own
    (no check on CPU)."""
    offload: Optional[bool] = None
    """Move the trainer's parameters, gradient buffers, master weights and optimizer state to host
    memory while the engine samples, and back before training (``--offload``). None: on when a GPU
    is present (the engine and the trainer share it)."""
    offload_optimizer: Optional[bool] = None
    """With ``offload``, also keep the FP32 master weights and Adam moments in host memory while the
    micro-batches run forward and backward: they come to the device for each optimizer step only
    (``--offload-optimizer``). Costs a round trip of that state per optimizer step; frees it from
    the training phase. None: on when offloading and the run fits the device only this way."""

    def validate(self) -> "MemoryConfig":
        if self.distributed_optimizer not in (None, True, False):
            raise ValueError(f"MemoryConfig.distributed_optimizer={self.distributed_optimizer!r}; valid: None, True, False")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"MemoryConfig.recompute={self.recompute!r}; valid: {list(RECOMPUTE)}")
        if self.attention not in ("auto",) + ATTENTION:
            raise ValueError(f"MemoryConfig.attention={self.attention!r}; valid: {['auto', *ATTENTION]}")
        if self.offload not in (None, True, False):
            raise ValueError(f"MemoryConfig.offload={self.offload!r}; valid: None, True, False")
        if self.offload_optimizer not in (None, True, False):
            raise ValueError(f"MemoryConfig.offload_optimizer={self.offload_optimizer!r}; valid: None, True, False")
        if self.offload_optimizer and self.offload is False:
            raise ValueError("MemoryConfig.offload_optimizer=True with offload=False: the optimizer state can only "
                             "stay in host memory when the trainer's state is offloaded; valid: offload=True or None")
        if self.device_memory_gib is not None and not (isinstance(self.device_memory_gib, (int, float))
                                                       and self.device_memory_gib > 0):
            raise ValueError(f"MemoryConfig.device_memory_gib={self.device_memory_gib!r}; valid: None or a number > 0")
        return self

    def recompute_overrides(self) -> dict:
        """``TransformerConfig`` fields of the recompute setting."""
        if self.recompute == "full":
            return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if self.recompute == "selective":
            return dict(recompute_granularity="selective")
        return {}


def resolved_attention(attention: str) -> str:
    """"auto" -> "fused" when TransformerEngine is importable, else "unfused"."""
    if attention != "auto":
        return attention
    import importlib.util

    return "fused" if importlib.util.find_spec("transformer_engine") is not None else "unfused"


def resolved_offload(config: MemoryConfig) -> bool:
    """``offload`` with None resolved: on with a GPU."""
    if config.offload is not None:
        return config.offload
    import torch

    return torch.cuda.is_available()


def device_memory_bytes(config: MemoryConfig) -> Optional[int]:
    """The configured device memory, else this process's GPU's, else None (CPU: nothing to check)."""
    if config.device_memory_gib is not None:
        return int(config.device_memory_gib * GiB)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None
