"""The RL policy loss as a Megatron ``forward_step`` / loss function, with global denominators.

How the pieces compose with ``forward_backward_func`` (megatron-core 0.16.1, checked in
``pipeline_parallel/schedules.py::forward_step_calc_loss`` and ``distributed/finalize_model_grads.py``):

0. The forward step runs the model under ``logprobs_head``: on the last pipeline stage the model's
   per-token output is the FP32 log-probs ``[B, S-1]`` of the targets, computed from the
   vocabulary-parallel logits by ``megatron_rlfp16.logprobs`` (chunked, custom backward).
1. Before any forward, the step's global counts N (response tokens) and Q (non-empty sequences) are
   summed over all its micro-batches and all-reduced over the data-parallel group
   (``global_counts``). Every micro-batch's ``policy_loss`` divides by these: the loss of micro-batch
   k on DP rank r is ℓ_{k,r} and Σ_{k,r} ℓ_{k,r} = L, the policy loss of the whole global batch.
2. The loss function returns Megatron's standard 2-tuple ``(M·D·ℓ_{k,r}, metrics)``, with M the
   step's micro-batches per rank and D the data-parallel size, and the model config has
   ``calculate_per_token_loss=False`` (Megatron's default). The schedule divides a 2-tuple's loss by
   M, Megatron's DDP scales gradients by 1/D before summing them over DP, and ``finalize_model_grads``
   divides by nothing more: net factor M·D / (M·D) = 1, so the reduced gradient is exactly ∇L for
   every aggregation, and the backward of each micro-batch carries D·ℓ_{k,r} ≈ L/M — the gradient
   magnitude of a mean loss, as in Megatron-LM pretraining and verl. That is what the FP16 loss
   scale is calibrated against: Megatron's per-token 3-tuple (``N·ℓ``, divided by N only after the
   reduction) would carry N× larger FP16 gradients through the backward, and the dynamic scale
   would settle N× lower than the real headroom (docs/fp16.md, "Why the scale no longer settles
   low"). The same loss function works in Megatron-LM's own training loop with its default flags.

If the counts were instead taken per micro-batch, each micro-batch's tokens would be weighted by
1/(its own size): the objective would change with the way the batch was split (docs/losses.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

from megatron_rlfp16.bridge.context import unwrap
from megatron_rlfp16.logprobs import next_token_logprobs, vocab_parallel_logprobs
from megatron_rlfp16.losses import PolicyLossConfig, policy_loss
from megatron_rlfp16.losses.correction import rollout_weights, weight_sums
from megatron_rlfp16.megatron.batch import MicroBatch, model_inputs, to_device

_DEFAULT = object()
MAX_METRICS = ("ratio_max", "correction_weight_max")
"""Metrics reduced with max (reported as one-element tensors); the others are token-weighted means
reported as Megatron-LM's ``[sum, count]`` pairs."""


@dataclasses.dataclass(frozen=True)
class GlobalCounts:
    """The denominators of one optimizer step, equal on every rank."""

    num_tokens: torch.Tensor
    """0-dim float32: response tokens (``loss_mask`` entries) over all micro-batches and DP ranks."""
    num_seqs: torch.Tensor
    """0-dim float32: sequences with at least one response token, same scope."""
    num_microbatches: int = 1
    """Micro-batches per rank in the step (what ``forward_backward_func`` divides a loss by)."""
    dp_size: int = 1
    """Data-parallel ranks the gradients are averaged over (Megatron DDP's 1/DP scaling)."""
    mask_tokens: Optional[torch.Tensor] = None
    """0-dim float32: ``loss_mask`` entries before ``rejection_mode="remove"`` took any out (None:
    nothing was removed, it equals ``num_tokens``)."""
    weight_mean: Optional[torch.Tensor] = None
    """0-dim float32: the step's mean correction weight, for ``correction_normalize`` (else None)."""

    @property
    def loss_multiplier(self) -> int:
        """M·D: undoes the schedule's 1/M and DDP's 1/D, so the summed gradient is ∇L."""
        return self.num_microbatches * self.dp_size


def global_counts(micro_batches: Sequence[MicroBatch], dp_group=None,
                  loss_config: Optional[PolicyLossConfig] = None) -> GlobalCounts:
    """Sums the step's token and sequence counts over ``micro_batches`` and the ``dp_group``.

    Collective over ``dp_group`` (None: no reduction). Token and sequence counts are integer sums
    (exact in float64), so they do not depend on the reduction order; at least 1 each, so an
    all-padding step divides by 1 instead of 0.

    With ``loss_config``, what its rollout correction needs before the first micro-batch: under
    ``rejection_mode="remove"`` the counts leave out the tokens ``policy_loss`` will remove (the same
    decision, on π_old: ``correction.rollout_weights``), and with ``correction_normalize`` the step's
    mean weight is summed over every micro-batch and rank (``weight_mean``).
    """
    # tokens, sequences, tokens before removal, weight sum, weight count
    sums = torch.zeros(5, dtype=torch.float64)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    for mb in micro_batches:
        mask = mb["loss_mask"] != 0
        sums[2] += mask.sum().cpu()
        kept, weights = _step_correction(mb, mask, loss_config)
        sums[0] += kept.sum().cpu()
        sums[1] += kept.any(-1).sum().cpu()
        if weights is not None:
            sums[3:] += weights.cpu().to(torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        device = _comm_device()
        sums = sums.to(device)
        dist.all_reduce(sums, group=dp_group)
    sums = sums.cpu()
    counts = sums[:3].clamp(min=1).to(ACCUM_DTYPE)
    normalize = loss_config is not None and loss_config.correction_normalize
    return GlobalCounts(
        num_tokens=counts[0], num_seqs=counts[1], num_microbatches=len(micro_batches), dp_size=dp_size,
        mask_tokens=counts[2] if counts[2] != counts[0] else None,
        weight_mean=(sums[3] / sums[4].clamp(min=1)).to(ACCUM_DTYPE) if normalize else None,
    )


def _step_correction(mb: MicroBatch, mask: torch.Tensor, config: Optional[PolicyLossConfig]):
    """(the tokens left after ``rejection_mode="remove"``, ``[sum, count]`` of the weights or None),
    decided as ``policy_loss`` decides them: on log π_old − log μ."""
    corrected = config is not None and config.corrected
    remove = corrected and config.rejection_mode == "remove"
    normalize = corrected and config.correction_normalize
    if not (remove or normalize):
        return mask, None
    mu = mb.get("rollout_logprobs")
    if mu is None:
        raise ValueError(f"the rollout correction ({config.correction!r}, rejection_mode="
                         f"{config.rejection_mode!r}) needs rollout_logprobs in every micro-batch")
    old = mb.get("old_logprobs")  # bypass without π_old under "remove" and "pg": policy_loss refuses it
    dtype = torch.promote_types(mu.dtype, ACCUM_DTYPE)
    mu = mu.detach().to(dtype).masked_fill(~mask, 0.0)
    old = mu if old is None else old.detach().to(dtype).masked_fill(~mask, 0.0)
    weight, seq_level = rollout_weights((old - mu).masked_fill(~mask, 0.0), mask, config)
    kept = mask & (weight != 0) if remove else mask
    return kept, weight_sums(weight, kept, seq_level) if normalize else None


def _comm_device() -> torch.device:
    from megatron_rlfp16.runtime import device

    return device()


def _default_tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
    tp_group=_DEFAULT,
):
    """``next_token_logprobs`` on Megatron's vocabulary-parallel logits ``[B, S, V_padded/TP]``.

    The outermost API: ``tp_group`` defaults to Megatron's tensor-parallel group; the shard's first
    column is ``tp_rank · V_padded/TP`` (Megatron's contiguous split).
    """
    if tp_group is _DEFAULT:
        tp_group = _default_tp_group()
    return next_token_logprobs(
        logits, input_ids, vocab_size=vocab_size, tp_group=tp_group, temperature=temperature,
        with_entropy=with_entropy, chunk_size=chunk_size,
    )


@contextlib.contextmanager
def logprobs_head(model, *, vocab_size: int, temperature: float = 1.0, with_entropy: bool = False,
                  chunk_size: Optional[int] = None):
    """While active, ``model(input_ids, position_ids, attention_mask, labels=input_ids)`` returns
    per-token FP32 log-probs ``[B, S-1]`` of ``input_ids[:, 1:]`` (``[2, B, S-1]`` log-probs and
    entropy with ``with_entropy``) on the last pipeline stage instead of cross-entropy.

    It temporarily replaces the model's ``compute_language_model_loss(labels, logits)``, the hook
    GPTModel calls with the output layer's ``[S, B, V/TP]`` logits when labels are given. Asking the
    model for logits instead (``labels=None``) makes GPTModel copy them to ``[B, S, V/TP]``, and
    autograd copy their gradient back: two extra full-vocabulary tensors per micro-batch, which were
    most of the RL step's overhead over a plain cross-entropy step on CPU (bench/logprob_bench.py).
    """
    bare = unwrap(model)
    tp_group = _default_tp_group()

    def head(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # logits [S, B, V/TP]; labels [B, S] = input_ids: the target of position s is labels[:, s+1]
        targets = F.pad(labels[:, 1:], (0, 1)).t()
        out = vocab_parallel_logprobs(
            logits, targets, vocab_size=vocab_size, tp_group=tp_group, temperature=temperature,
            with_entropy=with_entropy, chunk_size=chunk_size,
        )
        if with_entropy:
            return torch.stack([out[0].t()[:, :-1], out[1].t()[:, :-1]])
        return out.t()[:, :-1]

    if "compute_language_model_loss" in vars(bare):
        raise RuntimeError("logprobs_head is already active on this model (nested use)")
    bare.compute_language_model_loss = head
    try:
        yield
    finally:
        del bare.compute_language_model_loss


def rl_loss_func(
    batch: MicroBatch,
    output_tensor: torch.Tensor,
    *,
    loss_config: PolicyLossConfig,
    counts: GlobalCounts,
):
    """Megatron loss function for one micro-batch: ``(M·D·loss, metrics)`` (module docstring).

    ``output_tensor`` is the last stage's output under ``logprobs_head``: log-probs ``[B, S-1]``, or
    ``[2, B, S-1]`` log-probs and entropy. Needs ``calculate_per_token_loss=False`` in the model
    config (Megatron's default; ``wrap_ddp`` makes sure). ``metrics["loss"]`` is the
    ``[N·loss, n_local]`` pair, so summed over the step and divided it is the step's loss.
    """
    if output_tensor.dim() == 3:
        logprobs, entropy = output_tensor[0], output_tensor[1]
    else:
        logprobs, entropy = output_tensor, None
    mask = batch["loss_mask"] != 0
    loss, metrics = policy_loss(
        logprobs, batch.get("old_logprobs"), batch.get("rollout_logprobs"), batch["advantages"], mask,
        loss_config, ref_logprobs=batch.get("ref_logprobs"), entropy=entropy,
        num_tokens=counts.num_tokens.to(logprobs.device), num_seqs=counts.num_seqs.to(logprobs.device),
        weight_mean=None if counts.weight_mean is None else counts.weight_mean.to(logprobs.device),
    )
    n_local = mask.sum().to(torch.int)
    # The loss is reported per token of the micro-batches' masks (those before any removal).
    given = counts.num_tokens if counts.mask_tokens is None else counts.mask_tokens
    per_token = loss.detach() * given.to(loss.device)
    reported: Dict[str, torch.Tensor] = {"loss": torch.stack([per_token, n_local.to(loss.dtype)])}
    for key, value in metrics.items():
        if key in MAX_METRICS:
            reported[key] = value.view(1)
        else:
            reported[key] = torch.stack([value * n_local, n_local.to(value.dtype)])
    return loss * counts.loss_multiplier, reported


def make_forward_step(
    loss_config: PolicyLossConfig,
    counts: GlobalCounts,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    compute_entropy: bool = False,
):
    """A ``forward_step_func(data_iterator, model)`` for ``forward_backward_func``.

    The iterator yields micro-batch dicts (``megatron_rlfp16.megatron.batch``); every pipeline stage
    reads them (only the first uses ``input_ids`` for the embedding, only the last the loss keys).
    The entropy is computed when ``loss_config.entropy_coef != 0`` or ``compute_entropy`` (metric).
    """
    loss_config.validate()
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    with_entropy = compute_entropy or loss_config.entropy_coef != 0

    def forward_step(data_iterator, model):
        from megatron_rlfp16.megatron import routing
        from megatron_rlfp16.runtime import device

        batch = to_device(next(data_iterator), device())
        routing.feed(model, batch)
        ids, pos, mask = model_inputs(batch, device())
        with logprobs_head(model, vocab_size=vocab_size, temperature=temperature, with_entropy=with_entropy,
                           chunk_size=chunk_size):
            output = model(ids, pos, attention_mask=mask, labels=ids)
        return output, functools.partial(rl_loss_func, batch, loss_config=loss_config, counts=counts)

    return forward_step
