"""One RL optimizer step's forward and backward through Megatron's pipeline schedules.

``wrap_ddp`` wraps a ``GPTModel`` in Megatron's ``DistributedDataParallel`` with Megatron's default
loss convention (see ``loss_func``): the schedule divides each micro-batch's loss by the number of
micro-batches and DDP averages over data parallel; the loss undoes both, so the gradient is exactly
that of the global batch's loss. ``train_step`` computes the
global counts (collective over DP, before any backward), runs ``forward_backward_func`` over the
micro-batches and returns the step's reduced metrics on every rank. The optimizer step is the
caller's (Megatron's ``get_megatron_optimizer`` works on the wrapped model as usual).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rlfp16.losses import PolicyLossConfig
from megatron_rlfp16.megatron.batch import MicroBatch, check_micro_batches
from megatron_rlfp16.megatron.loss_func import GlobalCounts, global_counts, make_forward_step


def wrap_ddp(model, **ddp_config):
    """Megatron DDP around ``model`` for the RL loss; sets the model config's
    ``finalize_model_grads_func`` and ``no_sync_func``.

    ``ddp_config`` are ``DistributedDataParallelConfig`` fields (the run plan passes the precision's
    ``grad_reduce_in_fp32`` and ``check_for_nan_in_grad`` with the rest of its DDP settings);
    unset ones keep Megatron's defaults, except ``grad_reduce_in_fp32=True``. The RL loss follows
    Megatron's default loss convention (``calculate_per_token_loss=False``, see ``loss_func``): DDP
    reads that flag once, when built, to choose its gradient scaling (1/DP), so a config that has it
    on is refused here rather than silently mis-scaled.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = model.config
    if config.calculate_per_token_loss:
        raise ValueError(
            "model config has calculate_per_token_loss=True: the RL loss returns Megatron's standard "
            "(loss, metrics) 2-tuple with its own global denominators; build the model with "
            "calculate_per_token_loss=False (the default)"
        )
    ddp_config = dict(ddp_config)
    ddp_config.setdefault("grad_reduce_in_fp32", True)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(**ddp_config), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "finish_grad_sync"):
        raise ValueError(
            f"train_step needs a model wrapped in Megatron's DistributedDataParallel (use wrap_ddp), "
            f"got {type(model).__name__}"
        )
    if config.calculate_per_token_loss:
        raise ValueError(
            "model config has calculate_per_token_loss=True: DDP would sum gradients over DP and "
            "divide by a token count the RL loss (a (loss, metrics) 2-tuple with global "
            "denominators) never reports; build DDP with calculate_per_token_loss=False (the "
            "default, as wrap_ddp does)"
        )
    if config.finalize_model_grads_func is None:
        raise ValueError("model config has no finalize_model_grads_func: DP gradients would not be reduced")


def _groups():
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() != 1:
        raise NotImplementedError("context parallelism: the RL loss assumes whole sequences per rank")
    return ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()


def train_step(
    model,
    micro_batches: Sequence[MicroBatch],
    loss_config: PolicyLossConfig,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    compute_entropy: bool = False,
    zero_grad: bool = True,
    forward_backward_func: Optional[Callable] = None,
) -> Dict[str, float]:
    """Forward and backward of this DP rank's ``micro_batches``; gradients land in ``main_grad``.

    After it returns, every parameter's ``main_grad`` (reduced over DP) is the gradient of the
    policy loss of the global batch (all micro-batches of all DP ranks). Collective over the world.

    Returns, on every rank, ``loss`` (the global batch's loss), ``num_tokens``, ``num_seqs`` and the
    ``policy_loss`` metrics reduced over the global batch (token-weighted means; ``*_max`` maxima).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _check_model(model)
    batch_size, seq_length = check_micro_batches(micro_batches, training=True)
    dp_group, pp_group = _groups()
    counts = global_counts(micro_batches, dp_group, loss_config)
    if zero_grad:
        model.zero_grad_buffer()
        # Megatron's FP32 optimizer leaves ``param.grad`` aliased to ``main_grad`` after its step;
        # autograd would accumulate the next backward into that alias and DDP's hook would then add
        # it to ``main_grad`` a second time (the first micro-batch's gradient counted twice). What
        # Megatron-LM's loop does with ``optimizer.zero_grad()``.
        for param in model.parameters():
            param.grad = None
    forward_backward_func = forward_backward_func or get_forward_backward_func()
    store = forward_backward_func(
        forward_step_func=make_forward_step(
            loss_config, counts, vocab_size=vocab_size, temperature=temperature,
            chunk_size=chunk_size, compute_entropy=compute_entropy,
        ),
        data_iterator=iter(list(micro_batches)),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=False,
    )
    return reduce_metrics(store, counts, dp_group, pp_group)


def reduce_metrics(store: List[dict], counts: GlobalCounts, dp_group, pp_group) -> Dict[str, float]:
    """The loss function's reported metrics of every micro-batch, reduced over the step.

    ``[sum, count]`` pairs are summed over micro-batches and DP and divided; one-element entries are
    maxima. Computed on the last pipeline stage, then sent to every stage.
    """
    from megatron.core import parallel_state as ps

    result: Dict[str, float] = {}
    if ps.is_pipeline_last_stage():
        stacked = {k: torch.stack([mb[k] for mb in store]) for k in store[0]}
        sums = {k: v.sum(0) for k, v in stacked.items() if v.shape[1] == 2}
        maxes = {k: v.amax(0) for k, v in stacked.items() if v.shape[1] == 1}
        if sums:
            packed = torch.stack(list(sums.values())).to(torch.float64)
            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(packed, group=dp_group)
            for key, (num, den) in zip(sums, packed.tolist()):
                result[key] = num / den if den > 0 else 0.0
        if maxes:
            packed = torch.cat(list(maxes.values())).to(torch.float64)
            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=dp_group)
            result.update(zip(maxes, packed.tolist()))
        result.update(num_tokens=counts.num_tokens.item(), num_seqs=counts.num_seqs.item())
    if dist.get_world_size(pp_group) > 1:
        box = [result]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
        result = box[0]
    return result
