"""MoE routing replay: the modes, the routes' layout and how agreement is counted.

In MoE RL the rollout engine and the trainer can send one token to different experts: top-k routing
is discontinuous, so a rounding difference in the router logits flips a choice on a near-tie and the
trainer's probability of that token jumps. Replay removes the flip by making the trainer use the
experts the engine used (R3, "rollout routing replay") or, more weakly, the experts its own π_old
pass chose (R2: the policy updates then see one fixed routing, though not the engine's).

**Routes** of a batch of sequences (``[B, S]`` token ids, prompt + response, right-padded) are an
integer tensor ``[B, S, L, K]``: for the token at position ``j`` of sequence ``b``, the ``K`` experts
that decoder layer ``l`` (0-based, every layer of the model) chose when the engine ran that token.
Positions the engine never ran hold :data:`NO_ROUTE` — the last sampled token of each sequence (no
forward ever takes it as input) and padding — and so do the layers without experts; the trainer
routes those positions itself, which changes no log-prob that training uses (a causal model's last
position influences no other, and its logits predict nothing that is trained).
"""
from __future__ import annotations

from typing import Dict

import torch

REPLAY_MODES = ("none", "r2", "r3")
NO_ROUTE = -1
ROUTE_DTYPE = torch.int16
"""Routes are stored as int16 (experts up to 32,767; vLLM hands them over as uint8 or uint16)."""


def check_replay_mode(mode: str, *, field: str = "routing_replay") -> str:
    if mode not in REPLAY_MODES:
        raise ValueError(f"{field}={mode!r}; valid: {', '.join(REPLAY_MODES)} (none: the trainer routes "
                         "itself; r2: the updates replay the trainer's own π_old routing; r3: every "
                         "trainer forward replays the rollout engine's routing)")
    return mode


def check_routes(routes: torch.Tensor, *, batch: int, seq: int, layers: int, topk: int,
                 num_experts: int, what: str = "routes") -> None:
    """Shape and range of a batch's routes against the model's, with both shapes named."""
    want = (batch, seq, layers, topk)
    if routes.dim() != 4 or tuple(routes.shape[:2]) != (batch, seq) or tuple(routes.shape[2:]) != (layers, topk):
        raise ValueError(f"{what} have shape {tuple(routes.shape)} but the model needs {want} "
                         f"([batch, sequence, layers={layers}, top-k={topk}]): routes from another model "
                         "or another layout")
    if routes.numel():
        lo, hi = int(routes.min()), int(routes.max())
        if lo < NO_ROUTE or hi >= num_experts:
            raise ValueError(f"{what} hold expert ids from {lo} to {hi}; the model has {num_experts} experts "
                             f"(ids 0..{num_experts - 1}, {NO_ROUTE} for no route)")


def same_expert_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise: whether two ``[N, K]`` top-k index tensors choose the same set of experts (order
    within a row does not matter: the router weighs each chosen expert by its own score)."""
    return (a.sort(dim=-1).values == b.to(a.dtype).sort(dim=-1).values).all(dim=-1)


def agreement_metrics(sets_equal: int, sets: int, tokens_disagree: int, tokens: int) -> Dict[str, float]:
    """``router/agreement``: the fraction of (token, MoE layer) top-k sets where the trainer's own
    routing equals the rollout engine's; ``router/tokens_disagree``: the fraction of tokens that
    differ in at least one layer. Counted over every token the engine ran (prompt and response)."""
    return {"router/agreement": sets_equal / sets if sets else 1.0,
            "router/tokens_disagree": tokens_disagree / tokens if tokens else 0.0}
