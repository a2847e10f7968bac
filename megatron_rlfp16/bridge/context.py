"""Where this rank's shards sit: TP ranks and groups, leaders, layer and expert offsets.

Passed explicitly to the import and export code so that nothing there reads global process-group
state; ``ShardContext.from_megatron(model)`` builds it from Megatron's parallel state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ShardContext:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Optional[Any] = None
    etp_rank: int = 0
    """Rank in the expert tensor-parallel group (experts may use a different TP size)."""
    etp_size: int = 1
    etp_group: Optional[Any] = None
    layer_offset: int = 0
    """Global index of this pipeline stage's first layer."""
    expert_offset: int = 0
    """Global id of this expert-parallel rank's first expert."""
    in_leader_group: bool = True
    """Dense weights: this rank belongs to the data-parallel replica (DP rank 0) that exports them."""
    in_expert_leader_group: bool = True
    """Expert weights: this rank belongs to the expert-data-parallel replica that exports them."""
    world_group: Optional[Any] = None
    """The ranks dense weights travel among: the whole world, or one data-parallel replica (``scope``)."""
    expert_world_group: Optional[Any] = None
    """The ranks expert weights travel among: the whole world, or one expert-data-parallel replica
    (``scope``); ``None``: the same as ``world_group``."""

    def tp_for(self, is_expert: bool):
        """``(rank, size, group)`` of the TP group that shards a dense or an expert weight."""
        if is_expert:
            return self.etp_rank, self.etp_size, self.etp_group
        return self.tp_rank, self.tp_size, self.tp_group

    def leads(self, is_expert: bool) -> bool:
        """This rank sends the gathered weight (TP rank 0 of the exporting replica)."""
        rank, _, _ = self.tp_for(is_expert)
        return rank == 0 and self.participates(is_expert)

    def participates(self, is_expert: bool) -> bool:
        return self.in_expert_leader_group if is_expert else self.in_leader_group

    def group_for(self, is_expert: bool):
        """The process group a dense or an expert weight is sent in (``None``: the world)."""
        if is_expert and self.expert_world_group is not None:
            return self.expert_world_group
        return self.world_group

    @staticmethod
    def from_megatron(model, scope: str = "world") -> "ShardContext":
        """The context of this rank. ``scope="replica"`` keeps every transfer of an export inside the
        ranks that together hold one whole copy of what is sent: dense weights inside the
        data-parallel replica (Megatron's model-parallel group, TP x PP ranks), expert weights
        inside the expert-data-parallel replica (the expert tensor x expert x pipeline ranks, which
        hold every expert once). Every replica gathers and sends its own copy; nothing crosses
        replicas. ``scope="world"``: one replica sends to every rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        if scope not in ("world", "replica"):
            raise ValueError(f"ShardContext scope={scope!r}; valid: 'world', 'replica'")
        model = unwrap(model)
        config = model.config
        num_experts = getattr(config, "num_moe_experts", None) or 0
        ep_size = ps.get_expert_model_parallel_world_size()
        replica = scope == "replica" and ps.get_data_parallel_world_size() > 1
        expert_replica = (scope == "replica" and bool(num_experts)
                          and ps.get_expert_data_parallel_world_size() > 1)
        return ShardContext(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_group=ps.get_tensor_model_parallel_group(),
            etp_rank=ps.get_expert_tensor_parallel_rank() if num_experts else 0,
            etp_size=ps.get_expert_tensor_parallel_world_size() if num_experts else 1,
            etp_group=ps.get_expert_tensor_parallel_group() if num_experts else None,
            layer_offset=get_transformer_layer_offset(config),
            expert_offset=ps.get_expert_model_parallel_rank() * (num_experts // ep_size) if num_experts else 0,
            in_leader_group=replica or ps.get_data_parallel_rank() == 0,
            in_expert_leader_group=(expert_replica or ps.get_expert_data_parallel_rank() == 0) if num_experts else True,
            world_group=ps.get_model_parallel_group() if replica else dist.group.WORLD,
            expert_world_group=(ps.get_expert_tensor_model_pipeline_parallel_group() if expert_replica
                                else dist.group.WORLD),
        )

def unwrap(model):
    """The bare ``GPTModel`` inside DDP / Float16Module wrappers (or a one-element chunk list)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"expected one model chunk, got {len(model)} (virtual pipelining is not supported)")
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model
