"""Routing replay in the trainer: Megatron-Core's routers take given experts instead of choosing.

Megatron-Core's ``TopKRouter`` asks its ``router_replay`` object for the top-k
(``get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)``, 0.16 and 0.19).
:func:`install` puts a :class:`_LayerReplay` there on every router of the model, held together by a
:class:`RoutingReplay`:

- **Feeding.** Every forward step of the trainer (π_old recompute and the updates, all pipeline
  stages) hands its micro-batch to :func:`feed` before the model runs. Each router takes its layer's
  share of the micro-batch's routes ``[B, S, L, K]`` (``megatron_rlfp16.routing``) in the order its
  router sees tokens: Megatron's activations are ``[S, B, hidden]`` and the router flattens them
  sequence-major, so row ``s·B + b`` is token ``s`` of sequence ``b``; with sequence parallelism each
  tensor-parallel rank holds the contiguous ``S / TP`` positions of its rank. Expert ids stay global
  under expert parallelism (the router scores every expert; the dispatcher moves tokens).
- **Replay.** The router's scores are gathered at the given experts, so the gradient still reaches
  the router through them; positions without a route (``NO_ROUTE``) keep the router's own choice.
  Each router keeps the targets of every forward of the step in order: a forward takes the next one,
  and a forward that runs again inside backward (activation recompute) takes the next one of its own
  sequence — the same micro-batch, in the same order, whatever the pipeline schedule interleaves.
- **Record / compare.** In the π_old pass the routers also record their own choice (R2 replays it in
  the updates) and count where it differs from the rollout engine's (the router agreement metrics,
  measured whether or not the pass replays).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rlfp16.routing import agreement_metrics, check_routes, same_expert_sets

ROUTES_KEY = "routes"
"""Micro-batch key of the rollout engine's routes ``[B, S, L, K]``."""
OWN_ROUTES_KEY = "own_routes"
"""Micro-batch key of the routes the trainer recorded for it in the π_old pass (R2): per layer,
this rank's rows, as its router saw them."""


def _in_backward() -> bool:
    """Whether autograd's engine is running (a forward called from backward is a recompute)."""
    return torch._C._current_graph_task_id() != -1


class _LayerReplay:
    """One router's replay: Megatron's ``RouterReplay`` interface, fed by :class:`RoutingReplay`."""

    def __init__(self, hub: "RoutingReplay", layer: int):
        self.hub = hub
        self.layer = layer
        self.reset()

    def reset(self) -> None:
        self.targets: List[Optional[torch.Tensor]] = []
        self.forward_at = 0
        self.backward_at = 0
        self.recorded: List[torch.Tensor] = []

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        hub = self.hub
        recompute = _in_backward()
        if recompute:
            at, self.backward_at = self.backward_at, self.backward_at + 1
        else:
            at, self.forward_at = self.forward_at, self.forward_at + 1
        target = self.targets[at] if at < len(self.targets) else None
        if not recompute:
            if hub.recording:
                self.recorded.append(own.detach().clone())
            if hub.comparing and target is not None:
                hub.count(at, own, target)
        if target is None or not hub.replaying:
            return probs, own
        if target.shape != own.shape:
            raise ValueError(f"layer {self.layer}: routes for {tuple(target.shape)} (tokens, top-k) but the "
                             f"router has {tuple(own.shape)}: the micro-batch fed does not match the forward")
        target = target.to(own.device)
        chosen = torch.where(target >= 0, target.to(own.dtype), own)
        return scores.gather(1, chosen), chosen


class RoutingReplay:
    """The model's routers and what they do in the current phase (see :meth:`phase`)."""

    def __init__(self, routers: Dict[int, object], *, num_layers: int, topk: int, num_experts: int,
                 sequence_shards: int):
        self.routers = routers  # global layer (0-based) -> router
        self.layers = {layer: _LayerReplay(self, layer) for layer in routers}
        self.num_layers, self.topk, self.num_experts = num_layers, topk, num_experts
        self.sequence_shards = sequence_shards  # tensor-parallel ranks splitting the sequence (1: none)
        self.replaying = self.recording = self.comparing = False
        self._counts: Optional[torch.Tensor] = None  # (sets equal, sets compared), summed on the device
        self._token_flags: Dict[int, torch.Tensor] = {}
        for layer, router in routers.items():
            router.router_replay = self.layers[layer]

    # ---- phases ---------------------------------------------------------------------------------
    def phase(self, *, replay: bool = False, record: bool = False, compare: bool = False) -> None:
        """Starts a pass over a step's micro-batches: replay the fed routes, record the routers' own
        choice, and/or count its agreement with the fed routes."""
        for lr in self.layers.values():
            lr.reset()
        self.replaying, self.recording, self.comparing = replay, record, compare
        self._counts = None
        self._token_flags = {}

    def finish(self) -> None:
        for lr in self.layers.values():
            lr.reset()
        self.replaying = self.recording = self.comparing = False

    def feed(self, batch: dict) -> None:
        """The targets of one micro-batch's forward, for every router of this rank."""
        own = batch.get(OWN_ROUTES_KEY)
        routes = batch.get(ROUTES_KEY)
        if own is not None and self.replaying:
            for layer, lr in self.layers.items():
                lr.targets.append(own[layer])
            return
        if routes is None:
            for lr in self.layers.values():
                lr.targets.append(None)
            return
        b, s = batch["input_ids"].shape
        check_routes(routes, batch=b, seq=s, layers=self.num_layers, topk=self.topk,
                     num_experts=self.num_experts, what="the micro-batch's routes")
        rows = self._rows(routes)
        for layer, lr in self.layers.items():
            lr.targets.append(rows[:, :, layer].reshape(-1, self.topk))

    def _rows(self, routes: torch.Tensor) -> torch.Tensor:
        """``[B, S, L, K]`` -> ``[S_local, B, L, K]``: the router's token order on this rank."""
        from megatron.core import parallel_state as ps

        rows = routes.transpose(0, 1)
        if self.sequence_shards > 1:
            per = rows.shape[0] // self.sequence_shards
            rank = ps.get_tensor_model_parallel_rank()
            rows = rows[rank * per:(rank + 1) * per]
        return rows.long()

    def recorded(self) -> List[Dict[int, torch.Tensor]]:
        """Per forward of the finished pass (micro-batch order), each layer's own choice."""
        forwards = min((len(lr.recorded) for lr in self.layers.values()), default=0)
        return [{layer: lr.recorded[i] for layer, lr in self.layers.items()} for i in range(forwards)]

    # ---- agreement ------------------------------------------------------------------------------
    def count(self, forward: int, own: torch.Tensor, target: torch.Tensor) -> None:
        target = target.to(own.device)
        valid = target[:, 0] >= 0
        equal = same_expert_sets(own, target) & valid
        counts = torch.stack([equal.sum(), valid.sum()]).to(torch.float64)  # stays on the device: no sync
        self._counts = counts if self._counts is None else self._counts + counts
        flags = torch.stack([valid & ~equal, valid]).to(torch.uint8)  # [2, rows]
        previous = self._token_flags.get(forward)
        self._token_flags[forward] = flags if previous is None else torch.maximum(previous, flags)

    def agreement(self) -> Dict[str, float]:
        """The pass's router agreement over the whole model and the global batch (collective over
        the world: layers are summed over pipeline stages, tokens over data-parallel ranks and, with
        sequence parallelism, tensor-parallel ranks)."""
        from megatron.core import parallel_state as ps

        from megatron_rlfp16.runtime import device

        flags = [self._token_flags[k].cpu() for k in sorted(self._token_flags)]
        tokens = torch.cat(flags, dim=1) if flags else torch.zeros(2, 0, dtype=torch.uint8)
        pp = ps.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp) > 1:  # one token's layers live on several stages
            sizes = [None] * dist.get_world_size(pp)
            dist.all_gather_object(sizes, tokens.shape[1], group=pp)
            width = max(sizes)
            padded = torch.zeros(2, width, dtype=torch.uint8)
            padded[:, : tokens.shape[1]] = tokens
            padded = padded.to(device())
            dist.all_reduce(padded, op=dist.ReduceOp.MAX, group=pp)
            tokens = padded.cpu()
        token_counts = tokens.sum(dim=1).to(torch.float64)  # [disagreeing, counted]
        layer_counts = torch.zeros(2, dtype=torch.float64) if self._counts is None else self._counts.cpu()
        if dist.get_world_size(pp) > 1:
            layer_counts = layer_counts.to(device())
            dist.all_reduce(layer_counts, group=pp)
            layer_counts = layer_counts.cpu()
        packed = torch.cat([layer_counts, token_counts]).to(device())
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        if self.sequence_shards > 1:
            dist.all_reduce(packed, group=ps.get_tensor_model_parallel_group())
        equal, sets, disagree, tokens_n = packed.cpu().tolist()
        return agreement_metrics(equal, sets, disagree, tokens_n)


def install(model) -> RoutingReplay:
    """Puts a replay object on every MoE router of ``model`` (Megatron ``GPTModel``, DDP-wrapped or
    not); refuses a model without routers and router settings that bypass the replay hook."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rlfp16.bridge.context import unwrap
    from megatron_rlfp16.models.builder import model_sequence_multiple

    bare = unwrap(model)
    existing = getattr(bare, "_rlfp16_routing_replay", None)
    if existing is not None:
        return existing
    routers = {}
    for module in bare.modules():
        if isinstance(module, TopKRouter):
            if module.layer_number is None:
                raise ValueError("a MoE router has no layer number: build the model through GPTModel")
            routers[int(module.layer_number) - 1] = module
    if not routers:
        raise ValueError("routing replay needs a mixture-of-experts model; this model has no MoE router "
                         "(routing_replay: use 'none' for dense models)")
    config = bare.config
    if getattr(config, "moe_router_fusion", False):
        raise ValueError("routing replay: moe_router_fusion=True computes top-k in a fused kernel that "
                         "skips the replay hook; build the model with moe_router_fusion=False")
    if getattr(next(iter(routers.values())), "routing_type", "") == "sinkhorn":
        raise ValueError("routing replay: sinkhorn routing has no top-k to replay")
    hub = RoutingReplay(routers, num_layers=config.num_layers, topk=config.moe_router_topk,
                        num_experts=config.num_moe_experts, sequence_shards=model_sequence_multiple(bare))
    bare._rlfp16_routing_replay = hub
    return hub


def replay_of(model) -> Optional[RoutingReplay]:
    from megatron_rlfp16.bridge.context import unwrap

    return getattr(unwrap(model), "_rlfp16_routing_replay", None)


def feed(model, batch: dict) -> None:
    """Called by the forward steps before the model runs: no-op without an installed replay."""
    hub = replay_of(model)
    if hub is not None:
        hub.feed(batch)
