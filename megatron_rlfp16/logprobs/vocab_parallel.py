"""Per-token log-probs and entropy from vocabulary-sharded logits, in FP32, chunked over tokens.

With tensor parallelism the LM head leaves each rank ``[N, V/TP]`` logits: columns
``[vocab_start, vocab_start + V/TP)`` of the vocabulary. The softmax statistics are reduced across
the TP group with three all-reduce-able pieces per token: the max (MAX), the sum of exponentials and
the target's logit (SUM); the entropy adds Σ exp(y)·y (SUM). Two all-reduces per call, whatever the
number of chunks.

Why not Megatron's ``vocab_parallel_cross_entropy``: it subtracts the max from the logits *in place*
(the caller's logits change under its feet) and it keeps a full-vocabulary FP32 softmax of every
token for the backward. Here:

- the input logits are never written to, whatever their dtype;
- at most one chunk of tokens is upcast to FP32 at a time, in the forward and again in the backward
  (which recomputes the softmax per chunk from the saved per-token log-sum-exp), so the memory held
  between forward and backward is the low-precision logits (a reference, not a copy) plus a few FP32
  numbers per token;
- accumulation is FP32 whatever the logits dtype (FP16 / BF16 / FP32 in, FP32 out);
- columns past the true vocabulary size (Megatron pads it to a multiple of 128) are excluded: they
  are not part of the model's distribution and get a zero gradient.

Temperature is applied the way vLLM's sampler does before it reports ``processed_logprobs``: the
logits are upcast to FP32 and divided by T, then normalized. The returned log-probs and entropy are
those of the temperature-scaled distribution; their gradient flows to the unscaled logits (1/T).

Gradients, per token with p = softmax(x/T) over the whole (unpadded) vocabulary, t the target:
    ∂ log p_t / ∂x_j = (1[j = t] − p_j) / T
    ∂ H / ∂x_j       = −p_j (log p_j + H) / T
each rank computing the columns it owns; no communication in the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 32 << 20
"""Default size of one FP32 chunk (tokens × local vocabulary × 4 bytes); the forward holds at most
two such buffers at a time, the backward two plus the output gradient's chunk."""


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if _group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _chunk_tokens(chunk_size: Optional[int], valid: int) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(valid, 1)))


def _scaled_fp32(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new FP32 tensor x/T for a block of logits (never a view of the caller's logits)."""
    x = block.to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    return x


class _VocabParallelLogprobs(torch.autograd.Function):
    """Autograd function over flattened ``[N, V_local]`` logits; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, valid, temperature, chunk, with_entropy):
        n = logits.shape[0]
        stats = torch.zeros(n, 3 if with_entropy else 2, dtype=torch.float32, device=logits.device)
        if valid > 0:
            # The max of the low-precision values is exact and monotone under the FP32 upcast and
            # the division by T > 0, so this pass needs no FP32 copy.
            m = logits[:, :valid].amax(-1).to(torch.float32)
            if temperature != 1.0:
                m.div_(temperature)
        else:
            m = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
        _all_reduce(m, dist.ReduceOp.MAX, group)
        # A row whose logits are all -inf would give inf - inf; any finite shift is correct.
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < valid)
        local_t = torch.where(in_range, local_t, torch.zeros_like(local_t))
        for i in range(0, n if valid > 0 else 0, chunk):
            j = min(i + chunk, n)
            y = _scaled_fp32(logits[i:j, :valid], temperature)
            y.sub_(m[i:j, None])
            y_t = y.gather(1, local_t[i:j, None]).squeeze(1)
            stats[i:j, 1] = torch.where(in_range[i:j], y_t, torch.zeros_like(y_t))
            if with_entropy:
                e = torch.exp(y)
                stats[i:j, 0] = e.sum(-1)
                stats[i:j, 2] = e.mul_(y).sum(-1)
                del e
            else:
                stats[i:j, 0] = y.exp_().sum(-1)
            del y
        _all_reduce(stats, dist.ReduceOp.SUM, group)

        log_s = stats[:, 0].log()
        logprobs = stats[:, 1] - log_s
        lse = m + log_s
        entropy = log_s - stats[:, 2] / stats[:, 0] if with_entropy else None
        ctx.save_for_backward(logits, local_t, in_range, lse, entropy)
        ctx.valid, ctx.temperature, ctx.chunk, ctx.with_entropy = valid, temperature, chunk, with_entropy
        if with_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, local_t, in_range, lse, entropy = ctx.saved_tensors
        valid, temperature, chunk = ctx.valid, ctx.temperature, ctx.chunk
        n, width = logits.shape
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if valid < width:
            grad[:, valid:].zero_()
        g_lp = grad_logprobs.to(torch.float32)
        g_h = grad_entropy.to(torch.float32) if ctx.with_entropy else None
        for i in range(0, n if valid > 0 else 0, chunk):
            j = min(i + chunk, n)
            logp = _scaled_fp32(logits[i:j, :valid], temperature)
            logp.sub_(lse[i:j, None])
            if g_h is None:
                # dx = −g·p, written into the same buffer
                g = logp.exp_().mul_(-g_lp[i:j, None])
            else:
                p = torch.exp(logp)
                # dx = −p·(g_lp + g_H·(log p + H)): the bracket in place, then times −p
                g = logp.add_(entropy[i:j, None]).mul_(g_h[i:j, None]).add_(g_lp[i:j, None])
                g.mul_(p.neg_())
                del p
            hit = torch.where(in_range[i:j], g_lp[i:j], torch.zeros_like(g_lp[i:j]))
            g.scatter_add_(1, local_t[i:j, None], hit[:, None])
            if temperature != 1.0:
                g.div_(temperature)
            grad[i:j, :valid].copy_(g)
            del g, logp
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_size: int,
    tp_group=None,
    vocab_start_index: Optional[int] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs (and optionally entropy) of ``target`` under softmax(logits / T), in FP32.

    Args:
        logits: ``[..., V_local]`` this rank's vocabulary shard (FP32, FP16 or BF16); not modified.
        target: ``[...]`` global token ids. A target outside ``[0, vocab_size)`` gets a meaningless
            finite value (and a zero gradient to the target column): mask such positions.
        vocab_size: the true vocabulary size; columns with global index ``>= vocab_size`` (Megatron's
            padding) are not part of the distribution.
        tp_group: the process group the vocabulary is split over; None means the logits hold the
            whole vocabulary (no communication). Passed explicitly: nothing here reads global state.
        vocab_start_index: global index of this shard's first column; default
            ``rank_in_tp_group * V_local`` (Megatron's contiguous vocabulary split).
        temperature: T > 0; the distribution is softmax(logits / T), as sampled by vLLM.
        with_entropy: also return the per-token entropy of that distribution.
        chunk_size: tokens per FP32 chunk; default keeps one chunk near ``DEFAULT_CHUNK_BYTES``.

    Returns:
        ``logprobs`` ``[...]`` FP32, or ``(logprobs, entropy)`` with ``with_entropy``. Both are equal
        on every rank of ``tp_group``; gradients flow to this rank's logits shard only.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None or an int >= 1")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits has shape {tuple(logits.shape)}; "
            f"target must be logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    width = logits.shape[-1]
    if vocab_start_index is None:
        rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
        vocab_start_index = rank * width
    if not 0 < vocab_size:
        raise ValueError(f"vocab_size={vocab_size!r} must be > 0")
    valid = max(0, min(width, vocab_size - vocab_start_index))
    shape = target.shape
    flat = logits.reshape(-1, width)
    out = _VocabParallelLogprobs.apply(
        flat, target.reshape(-1).long(), tp_group, vocab_start_index, valid, float(temperature),
        _chunk_tokens(chunk_size, valid), with_entropy,
    )
    if with_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)
