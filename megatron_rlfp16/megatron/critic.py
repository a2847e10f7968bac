"""The PPO critic on Megatron-Core: a ``GPTModel`` whose vocabulary head is replaced by a scalar
value head, its forward-only values and its clipped value-loss step.

``make_critic(model)`` turns a ``GPTModel`` (built and loaded from an HF checkpoint, the policy's or
another) into a critic: the output layer becomes ``ValueHead``, one FP32 row of ``hidden`` weights
and a bias, held whole on every tensor-parallel rank. Under sequence parallelism the head first
gathers the sequence; its backward splits the gradient back (``tensor_parallel_output_grad=False``)
instead of summing it, because every TP rank computes the same full head, so each rank's gradient
is already the whole one. The embedding is untied from the (removed) vocabulary head. Called with
``labels``, the model returns the values ``[B, S]`` in FP32: V at position s is the value of the
state that ends with token s, aligned with the log-prob of the target s + 1 after ``[:, :-1]``.

``compute_values`` is the forward-only pass (every pipeline stage gets the result);
``critic_train_step`` one optimizer step's forward and backward of ``losses.value.value_loss`` with
the step's global token count, under the same loss convention as the policy (``loss_func``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.bridge.context import unwrap
from megatron_rlfp16.losses.value import value_loss
from megatron_rlfp16.megatron.batch import MicroBatch, check_micro_batches, model_inputs, to_device
from megatron_rlfp16.megatron.loss_func import GlobalCounts, global_counts


@dataclasses.dataclass(kw_only=True)
class CriticConfig:
    """The value model of PPO (``RLConfig.advantage_estimator="gae"``); unused otherwise."""

    hf_dir: Optional[str] = None
    """HF checkpoint the critic's trunk starts from (its vocabulary head is replaced by a zero value
    head); None: the policy's. Must have the policy's vocabulary."""
    lr: Optional[float] = None
    """The critic's learning rate; None: the policy's (``RunConfig.lr``)."""
    value_clip: Optional[float] = 0.2
    """c of the clipped value loss (V kept within ±c of the values the step started from); None:
    the plain squared error."""
    warmup_steps: int = 0
    """Steps at the start of a run in which only the critic learns (the policy stays as it is), so
    that the first policy updates see trained values."""

    def validate(self) -> "CriticConfig":
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"CriticConfig.lr={self.lr!r} is invalid; valid: None or a finite number > 0")
        if self.value_clip is not None and not (self.value_clip > 0 and math.isfinite(self.value_clip)):
            raise ValueError(f"CriticConfig.value_clip={self.value_clip!r} is invalid; valid: None or a number > 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"CriticConfig.warmup_steps={self.warmup_steps!r} is invalid; valid: an int >= 0")
        return self


VALUE_KEYS = ("old_values", "returns")
"""Per-token ``[B, S-1]`` keys a critic micro-batch needs for training, besides ``input_ids`` and
``loss_mask``."""


class ValueHead(torch.nn.Module):
    """``hidden [S or S/TP, B, H] -> ([S, B, 1] FP32 values, None)``, called as Megatron calls its
    output layer. Zero-initialized: a new critic predicts 0 everywhere.

    Its parameters have the model's dtype (the optimizer keeps FP32 masters of FP16/BF16 ones, and
    Megatron 0.16's FP16 optimizer cannot checkpoint FP32 parameters mixed into its groups); the
    product is computed in FP32."""

    def __init__(self, hidden_size: int, *, gather_sequence: bool, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.gather_sequence = gather_sequence  # the model runs sequence parallel

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.gather_sequence:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden.to(ACCUM_DTYPE), self.weight.to(ACCUM_DTYPE),
                                          self.bias.to(ACCUM_DTYPE)), None


def _values_of(labels: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return output[..., 0].t()  # [S, B, 1] -> [B, S]


def make_critic(model):
    """Turns a bare ``GPTModel`` (not yet in DDP) into a critic in place and returns it."""
    if hasattr(model, "zero_grad_buffer"):
        raise ValueError("make_critic needs the bare GPTModel: wrap it in DDP afterwards")
    if is_critic(model):
        return model
    if getattr(model, "post_process", True):
        model.output_layer = ValueHead(model.config.hidden_size, gather_sequence=model.config.sequence_parallel,
                                       dtype=model.config.params_dtype)
    # No vocabulary head is left to share the embedding with (nor to all-reduce its gradient with).
    model.share_embeddings_and_output_weights = False
    model.compute_language_model_loss = _values_of
    model._rlfp16_critic = True
    return model


def is_critic(model) -> bool:
    return bool(getattr(unwrap(model), "_rlfp16_critic", False))


def _check_critic(model) -> None:
    if not is_critic(model):
        raise ValueError("expected a critic (megatron.critic.make_critic), got a model with a vocabulary head")


@torch.no_grad()
def compute_values(model, micro_batches: Sequence[MicroBatch], *,
                   forward_backward_func: Optional[Callable] = None) -> torch.Tensor:
    """Values ``[num_micro_batches·B, S-1]`` (FP32) of this rank's micro-batches, on every rank
    (broadcast over the pipeline). Collective over the world."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlfp16.runtime import device

    _check_critic(model)
    batch_size, seq_length = check_micro_batches(micro_batches, training=False)

    def forward_step(data_iterator, model):
        ids, pos, mask = model_inputs(next(data_iterator), device())
        return model(ids, pos, attention_mask=mask, labels=ids), lambda out, non_loss_data=False: out

    forward_backward_func = forward_backward_func or get_forward_backward_func()
    store = forward_backward_func(
        forward_step_func=forward_step, data_iterator=iter(list(micro_batches)), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=batch_size,
        forward_only=True, collect_non_loss_data=True,
    )
    if ps.is_pipeline_last_stage():
        result = torch.cat([v[:, :-1] for v in store]).contiguous()
    else:
        result = torch.empty(len(micro_batches) * batch_size, seq_length - 1, dtype=ACCUM_DTYPE, device=device())
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return result


def value_loss_func(batch: MicroBatch, output: torch.Tensor, *, clip: Optional[float], counts: GlobalCounts):
    """Megatron loss function of one critic micro-batch: ``(M·D·loss, metrics)`` as ``rl_loss_func``."""
    values = output[:, :-1]
    mask = batch["loss_mask"] != 0
    loss, metrics = value_loss(values, batch["old_values"], batch["returns"], mask, clip=clip,
                               num_tokens=counts.num_tokens.to(values.device))
    n_local = mask.sum().to(loss.dtype)
    reported = {"value_loss": torch.stack([loss.detach() * counts.num_tokens.to(loss.device), n_local])}
    reported.update({k: torch.stack([v * n_local, n_local]) for k, v in metrics.items()})
    return loss * counts.loss_multiplier, reported


def critic_train_step(model, micro_batches: Sequence[MicroBatch], *, clip: Optional[float] = 0.2,
                      forward_backward_func: Optional[Callable] = None) -> Dict[str, float]:
    """Forward and backward of the clipped value loss over this DP rank's ``micro_batches`` (each
    with ``input_ids``, ``loss_mask``, ``old_values`` and ``returns``); gradients land in
    ``main_grad``, reduced over DP. Returns the step's ``value_loss``, ``value_clip_frac``,
    ``value_mean``, ``value_error`` on every rank. Collective over the world."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlfp16.megatron.train import _check_model, _groups, reduce_metrics
    from megatron_rlfp16.runtime import device

    _check_model(model)
    _check_critic(model)
    batch_size, seq_length = check_micro_batches(micro_batches, training=False)
    for k, mb in enumerate(micro_batches):
        missing = [key for key in ("loss_mask",) + VALUE_KEYS if key not in mb]
        if missing:
            raise ValueError(f"critic micro-batch {k} lacks {missing}; it needs {('input_ids', 'loss_mask') + VALUE_KEYS}")
        for key in ("loss_mask",) + VALUE_KEYS:
            if tuple(mb[key].shape) != (batch_size, seq_length - 1):
                raise ValueError(f"critic micro-batch {k}: {key} has shape {tuple(mb[key].shape)}; expected "
                                 f"[B, S-1] = {(batch_size, seq_length - 1)}")
    dp_group, pp_group = _groups()
    counts = global_counts(micro_batches, dp_group)
    model.zero_grad_buffer()
    for param in model.parameters():
        param.grad = None  # see train_step: the FP32 optimizer's alias of main_grad

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device())
        ids, pos, mask = model_inputs(batch, device())
        output = model(ids, pos, attention_mask=mask, labels=ids)
        return output, functools.partial(value_loss_func, batch, clip=clip, counts=counts)

    forward_backward_func = forward_backward_func or get_forward_backward_func()
    store = forward_backward_func(
        forward_step_func=forward_step, data_iterator=iter(list(micro_batches)), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=batch_size,
        forward_only=False,
    )
    result = reduce_metrics(store, counts, dp_group, pp_group)
    return {k: v for k, v in result.items() if k.startswith("value_")}
