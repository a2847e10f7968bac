"""HF <-> Megatron weights: declarative per-family mappings, sharded import, streaming export.

Typical use on every rank::

    model, arch = build_model(read_config_json(hf_dir))
    load_hf_checkpoint(model, arch, hf_dir)                 # each rank reads only its shards
    for name, tensor in export_hf(model, arch, dtype=precision.rollout_precision.torch_dtype):
        ...                                                 # collective: every rank iterates
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch

from megatron_rlfp16.bridge.context import ShardContext, unwrap
from megatron_rlfp16.bridge.core import Bridge, StagingBuffer, export_hf_weights, import_hf_weights
from megatron_rlfp16.bridge.names import to_canonical, to_te
from megatron_rlfp16.models.hf_config import ModelArch


def load_hf_checkpoint(model, arch: ModelArch, hf_dir_or_reader) -> None:
    """Fills this rank's shards of ``model`` from an HF directory (or a reader with ``.get``)."""
    from megatron_rlfp16.checkpoint.hf_io import SafetensorsReader

    reader = SafetensorsReader(hf_dir_or_reader) if isinstance(hf_dir_or_reader, str) else hf_dir_or_reader
    bare = unwrap(model)
    import_hf_weights(bare.named_parameters(), Bridge(arch), ShardContext.from_megatron(bare), reader)


def export_hf(
    model,
    arch: ModelArch,
    *,
    dtype: Optional[torch.dtype] = None,
    bucket_bytes: int = 512 << 20,
    receivers: Union[str, int] = "all",
    staging: Optional[StagingBuffer] = None,
    scope: str = "world",
    merge_lora: bool = False,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Collective generator of the full HF tensors of a (sharded) Megatron model; see
    :func:`megatron_rlfp16.bridge.core.export_hf_weights`. ``scope="replica"`` (with ``receivers="all"``,
    the refit) keeps every transfer inside a replica: dense weights inside the data-parallel replica,
    expert weights inside the expert-data-parallel replica (``ShardContext.from_megatron``).
    ``merge_lora``: a model with LoRA adapters exports ``W + (alpha / r) · B · A`` for every adapted
    weight (merged in FP32, one weight at a time); without it the base weights go out as they are."""
    if scope == "replica" and receivers != "all":
        raise ValueError(f"export_hf: scope='replica' needs receivers='all', got receivers={receivers!r}")
    bare = unwrap(model)
    named = bare.named_parameters()
    if merge_lora:
        from megatron_rlfp16.lora.layers import merged_named_parameters

        named = merged_named_parameters(bare)
    return export_hf_weights(
        named, Bridge(arch), ShardContext.from_megatron(bare, scope=scope),
        dtype=dtype, bucket_bytes=bucket_bytes, receivers=receivers, staging=staging,
    )


__all__ = [
    "Bridge", "ShardContext", "StagingBuffer", "export_hf", "export_hf_weights", "import_hf_weights",
    "load_hf_checkpoint", "to_canonical", "to_te", "unwrap",
]
