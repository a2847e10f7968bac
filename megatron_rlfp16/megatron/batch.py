"""Micro-batch dicts: what the RL forward step reads, checked once per step.

A micro-batch is a dict of tensors. ``input_ids`` is ``[B, S]``; every per-token tensor is
``[B, S-1]``, aligned with the targets ``input_ids[:, 1:]`` (``megatron_rlfp16.logprobs.next_token``;
the layout of ``RolloutBatch.to_tensors``):

| key | required | shape | meaning |
| --- | --- | --- | --- |
| ``input_ids`` | yes | ``[B, S]`` | prompt + response token ids, right-padded to S |
| ``loss_mask`` | for training | ``[B, S-1]`` | bool / 0-1: targets whose log-prob is trained (the response) |
| ``advantages`` | for training | ``[B]`` or ``[B, S-1]`` | |
| ``old_logprobs`` | see ``policy_loss`` | ``[B, S-1]`` | log π_old; absent = bypass mode (π_old := μ) |
| ``rollout_logprobs`` | see ``policy_loss`` | ``[B, S-1]`` | log μ from the rollout engine |
| ``ref_logprobs`` | if ``kl_coef != 0`` | ``[B, S-1]`` | log π_ref |
| ``position_ids`` | no | ``[B, S]`` | default ``arange(S)`` per row |
| ``attention_mask`` | no | ``[1, 1, S, S]`` | Megatron boolean mask (True = masked); default causal |
| ``routes`` | for R3 | ``[B, S, L, K]`` | the rollout engine's experts per token and layer (``megatron_rlfp16.routing``) |
| ``own_routes`` | for R2 | per layer ``[rows, K]`` | the routers' own choice, recorded in the π_old pass (``megatron.routing``) |

Right padding needs no padding mask: with a causal mask no real token attends to a later pad.
Every micro-batch of a step has the same ``[B, S]``: the pipeline schedule communicates activations
of one fixed shape ``[S, B, hidden]``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megatron_rlfp16.models import causal_mask

MicroBatch = Dict[str, torch.Tensor]
PER_TOKEN_KEYS = ("loss_mask", "old_logprobs", "rollout_logprobs", "ref_logprobs")


def check_micro_batches(micro_batches: Sequence[MicroBatch], *, training: bool) -> Tuple[int, int]:
    """Checks keys and shapes; returns the common ``(B, S)`` of ``input_ids``. Errors name the
    micro-batch and the key."""
    if not micro_batches:
        raise ValueError("micro_batches is empty: a step needs at least one micro-batch")
    shape = None
    for i, mb in enumerate(micro_batches):
        if "input_ids" not in mb:
            raise ValueError(f"micro-batch {i} has no 'input_ids' (keys: {sorted(mb)})")
        ids = mb["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"micro-batch {i}: input_ids must be [B, S], got {tuple(ids.shape)}")
        if shape is None:
            shape = tuple(ids.shape)
        elif tuple(ids.shape) != shape:
            raise ValueError(
                f"micro-batch {i}: input_ids has shape {tuple(ids.shape)} but micro-batch 0 has {shape}; "
                "pad every micro-batch of a step to one [B, S] (the pipeline schedule needs it)"
            )
        if training:
            for key in ("loss_mask", "advantages"):
                if key not in mb:
                    raise ValueError(f"micro-batch {i} has no {key!r}, which training needs")
        expected = {key: (shape[0], shape[1] - 1) for key in PER_TOKEN_KEYS}
        expected["position_ids"] = shape
        for key, want in expected.items():
            if mb.get(key) is not None and tuple(mb[key].shape) != want:
                raise ValueError(
                    f"micro-batch {i}: {key} has shape {tuple(mb[key].shape)}, expected {want} "
                    f"(input_ids is {shape}; per-token tensors are aligned with input_ids[:, 1:])"
                )
    return shape


def model_inputs(mb: MicroBatch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids, attention_mask)`` on ``device``, with the defaults filled in."""
    ids = mb["input_ids"].to(device, non_blocking=True)
    b, s = ids.shape
    pos = mb.get("position_ids")
    pos = torch.arange(s, device=device).expand(b, s) if pos is None else pos.to(device, non_blocking=True)
    mask = mb.get("attention_mask")
    mask = causal_mask(s, device=device) if mask is None else mask.to(device, non_blocking=True)
    return ids, pos, mask


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def split(tensors: MicroBatch, micro_batch_size: int) -> List[MicroBatch]:
    """Splits a dict of ``[N, ...]`` tensors into micro-batches of ``micro_batch_size`` rows."""
    n = next(iter(tensors.values())).shape[0]
    if n % micro_batch_size:
        raise ValueError(f"{n} rows do not split into micro-batches of {micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in tensors.items()} for i in range(0, n, micro_batch_size)]
