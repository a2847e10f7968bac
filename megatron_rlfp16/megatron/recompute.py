"""Forward-only log-prob recomputation (π_old, π_ref) through Megatron's pipeline schedules.

``compute_logprobs`` runs ``forward_backward_func(forward_only=True, collect_non_loss_data=True)``
over the micro-batches under ``logprobs_head``: the last pipeline stage turns each micro-batch's
vocabulary-parallel logits into ``[B, S-1]`` FP32 log-probs (aligned with ``input_ids[:, 1:]``, as
everywhere in the trainer), which are broadcast over the pipeline group so every rank returns the
same tensor. TP ranks agree already (the vocabulary reduction is an all-reduce); DP ranks return
their own micro-batches' log-probs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.megatron import routing
from megatron_rlfp16.megatron.batch import MicroBatch, check_micro_batches, model_inputs
from megatron_rlfp16.megatron.loss_func import logprobs_head


def _collect(output_tensor, non_loss_data: bool = False):
    # Under logprobs_head the model's output already is the [B, S-1] log-probs (or [2, B, S-1]).
    return output_tensor if output_tensor.dim() == 3 else output_tensor[None]


@torch.no_grad()
def compute_logprobs(
    model,
    micro_batches: Sequence[MicroBatch],
    *,
    vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
    forward_backward_func: Optional[Callable] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs ``[num_micro_batches·B, S-1]`` (FP32) of this rank's micro-batches' targets, on
    every rank; with ``with_entropy`` also the entropy, same shape. Collective over the world.

    ``temperature`` must be the rollout's sampling temperature for π_old to be the distribution the
    rollout's log-probs (``processed_logprobs``) describe.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlfp16.runtime import device

    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    batch_size, seq_length = check_micro_batches(micro_batches, training=False)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        routing.feed(model, batch)
        ids, pos, mask = model_inputs(batch, device())
        with logprobs_head(model, vocab_size=vocab_size, temperature=temperature, with_entropy=with_entropy,
                           chunk_size=chunk_size):
            output = model(ids, pos, attention_mask=mask, labels=ids)
        return output, _collect

    forward_backward_func = forward_backward_func or get_forward_backward_func()
    store = forward_backward_func(
        forward_step_func=forward_step,
        data_iterator=iter(list(micro_batches)),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=True,
        collect_non_loss_data=True,
    )
    rows = 2 if with_entropy else 1
    if ps.is_pipeline_last_stage():
        result = torch.cat(list(store), dim=1).contiguous()
    else:
        result = torch.empty(rows, len(micro_batches) * batch_size, seq_length - 1, dtype=ACCUM_DTYPE,
                             device=device())
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return (result[0], result[1]) if with_entropy else result[0]
