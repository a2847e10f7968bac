"""The bridge between Megatron shards and Hugging Face tensors: sharded import, streaming export.

``import_hf_weights`` fills each rank's parameters from an HF reader, reading only the tensors that
rank's shards need. ``export_hf_weights`` is a *collective* generator: every rank calls it and
iterates it to the end; the exporting replica gathers TP shards, packs the HF tensors into a bucket
and sends it to the receivers, who get ``(hf_name, tensor)`` pairs. The same generator writes files
(``tools/convert_checkpoint.py export``) and refits the colocated vLLM engine.

Memory: the extra memory of an export is one bucket (the packed HF tensors, in a staging buffer
reused from bucket to bucket) plus, on the exporting ranks, one gathered tensor at a time;
conversions (QKV de-interleave, gate/up split, row-parallel concatenation) are views copied straight
into the bucket.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from megatron_rlfp16.bridge.context import ShardContext
from megatron_rlfp16.bridge.families import mappings_for
from megatron_rlfp16.bridge.mappings import Mapping
from megatron_rlfp16.bridge.names import to_canonical
from megatron_rlfp16.models.hf_config import ModelArch

_ALIGN = 64  # byte alignment of tensors packed in a bucket


class Bridge:
    """Resolves canonical Megatron names of one model family to their mappings."""

    def __init__(self, arch: ModelArch):
        self.arch = arch
        self.mappings: List[Mapping] = mappings_for(arch)

    def resolve(self, canonical: str) -> Tuple[Mapping, Dict[str, str]]:
        for m in self.mappings:
            numbers = m.match(canonical)
            if numbers is not None:
                return m, m.hf_names(numbers)
        raise KeyError(f"Megatron parameter {canonical!r} has no mapping in the {self.arch.family!r} bridge")

    def hf_names(self) -> List[str]:
        """Every HF tensor name of the full model (what an export produces)."""
        names = []
        for canonical in self.canonical_names():
            if self._skip_on_export(canonical):
                continue
            names.extend(self.resolve(canonical)[1].values())
        return names

    def canonical_names(self) -> List[str]:
        """Canonical Megatron names of the full model (all layers, all experts), in export order,
        expanded from the family's mapping table: a pattern's first ``*`` is the layer, its second
        the expert. The table is the only list of a family's parameters."""
        a = self.arch
        ranges = [range(a.num_layers), range(a.num_experts or 0)]
        names: List[str] = []
        for m in self.mappings:
            parts = m.megatron.split("*")
            if len(parts) - 1 > len(ranges):
                raise ValueError(f"{m!r}: more wildcards than layer and expert")
            for numbers in itertools.product(*ranges[: len(parts) - 1]):
                names.append("".join(p + (str(n) if i < len(numbers) else "")
                                     for i, (p, n) in enumerate(itertools.zip_longest(parts, numbers))))
        return sorted(names, key=_export_order)

    def _skip_on_export(self, canonical: str) -> bool:
        # A tied LM head is the embedding; the last pipeline stage's copy is not exported again.
        return self.arch.tie_embeddings and canonical == "output_layer.weight"


def _local_entries(named: Iterable[Tuple[str, torch.Tensor]], ctx: ShardContext):
    for name, t in named:
        canonical = to_canonical(name, layer_offset=ctx.layer_offset, expert_offset=ctx.expert_offset)
        if canonical is not None:
            yield name, canonical, t


@torch.no_grad()
def import_hf_weights(
    named_params: Iterable[Tuple[str, torch.Tensor]],
    bridge: Bridge,
    ctx: ShardContext,
    reader,
) -> List[str]:
    """Copies this rank's shards from ``reader`` (``.get(hf_name) -> Tensor``) into the parameters.

    Every parameter must be covered; a shape that does not match is an error naming both sides.
    Returns the HF names that were read.
    """
    read: List[str] = []
    for name, canonical, param in _local_entries(named_params, ctx):
        mapping, hf_names = bridge.resolve(canonical)
        hf = {role: reader.get(n) for role, n in hf_names.items()}
        read.extend(hf_names.values())
        rank, size, _ = ctx.tp_for(mapping.is_expert)
        shard = mapping.to_megatron(hf, rank, size, bridge.arch)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"{', '.join(hf_names.values())}: gives a shard of shape {tuple(shard.shape)} for Megatron "
                f"parameter {name!r} of shape {tuple(param.shape)} (tp rank {rank} of {size}); "
                "the checkpoint does not match the model config"
            )
        param.copy_(shard)
    return read


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _export_order(canonical: str):
    group = 0 if canonical.startswith("embedding.") else 1 if canonical.startswith("decoder.layers.") else 2
    return (group, _natural_key(canonical))


def _gather_full(t: torch.Tensor, mapping: Mapping, ctx: ShardContext) -> torch.Tensor:
    """All TP shards of ``t`` concatenated along the mapping's gather dim (``[size, ...]`` for dim 1)."""
    _, size, group = ctx.tp_for(mapping.is_expert)
    if mapping.gather_dim is None or size == 1:
        return t.unsqueeze(0) if mapping.gather_dim == 1 else t
    t = t.contiguous()
    if mapping.gather_dim == 0:
        full = torch.empty((size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.all_gather(list(full.chunk(size, dim=0)), t, group=group)
    else:
        full = torch.empty((size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        dist.all_gather(list(full.unbind(0)), t, group=group)
    return full


def _full_meta(t: torch.Tensor, mapping: Mapping, ctx: ShardContext) -> torch.Tensor:
    _, size, _ = ctx.tp_for(mapping.is_expert)
    shape = tuple(t.shape)
    if mapping.gather_dim == 0:
        shape = (size * shape[0],) + shape[1:]
    elif mapping.gather_dim == 1:
        shape = (size,) + shape
    return torch.empty(shape, dtype=t.dtype, device="meta")


def _bucket_plan(specs: List[dict], bucket_bytes: int) -> List[List[dict]]:
    buckets: List[List[dict]] = []
    size = 0
    for spec in specs:
        last = buckets[-1][0] if buckets else None
        if (last is None or (last["src"], last["expert"]) != (spec["src"], spec["expert"])
                or size + spec["bytes"] > bucket_bytes):
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += spec["bytes"]
    return buckets


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class StagingBuffer:
    """The byte buffer buckets are packed into, reused bucket after bucket (and, when the caller keeps
    it, export after export: a refit every RL step then allocates nothing). It grows to the largest
    bucket and stays that size."""

    def __init__(self):
        self.data: Optional[torch.Tensor] = None

    def get(self, nbytes: int, device) -> torch.Tensor:
        if self.data is None or self.data.numel() < nbytes or self.data.device != torch.device(device):
            self.data = None  # release the old buffer before allocating the new one
            self.data = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.data[:nbytes]


def export_hf_weights(
    named_params: Iterable[Tuple[str, torch.Tensor]],
    bridge: Bridge,
    ctx: ShardContext,
    *,
    dtype: Optional[torch.dtype] = None,
    bucket_bytes: int = 512 << 20,
    receivers: Union[str, int] = "all",
    staging: Optional[StagingBuffer] = None,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Collective generator of ``(hf_name, full_tensor)`` for the whole model.

    Every rank of the world must call it with its own parameters and exhaust it. A parameter may
    also be an object with ``shape``, ``dtype``, ``device`` and ``materialize()`` (the tensor, made
    when its bucket is packed: ``lora.MergedWeight``). ``receivers="all"``
    gives every rank every tensor (colocated refit); an int gives them to that global rank only (file
    export), and the other ranks yield nothing. Tensors are views of their bucket, cast to ``dtype``
    (default: the parameter's dtype). Each bucket gets a fresh buffer unless a ``staging`` buffer is
    passed: then every bucket is packed into it, nothing is allocated after the first export, and a
    view is valid only until the next bucket is packed — for consumers that copy each tensor as
    they receive it (the file writer does; vLLM's layer-wise reload keeps references, so the refit
    passes none).
    """
    me = dist.get_rank()
    local, specs = _plan(named_params, bridge, ctx, dtype)
    device = _device_of(local)
    for bucket in _bucket_plan(specs, bucket_bytes):
        views = _transfer_bucket(bucket, local, bridge, ctx, me, receivers, staging or StagingBuffer(), device)
        yield from views
        del views


@torch.no_grad()
def _plan(named_params, bridge: Bridge, ctx: ShardContext, dtype):
    """This rank's entries by canonical name, and the global, ordered list of what to export."""
    me = dist.get_rank()
    local = {}
    mine = []
    for name, canonical, t in _local_entries(named_params, ctx):
        if bridge._skip_on_export(canonical):
            continue
        mapping, hf_names = bridge.resolve(canonical)
        local[canonical] = (mapping, hf_names, t)
        if ctx.leads(mapping.is_expert):
            out_dtype = dtype or t.dtype
            outs = mapping.to_hf(_full_meta(t, mapping, ctx), ctx.tp_for(mapping.is_expert)[1],
                                 bridge.arch, hf_names)
            tensors = [(n, tuple(shape)) for n, shape, _ in outs]
            nbytes = sum(_aligned(torch.Size(s).numel() * out_dtype.itemsize) for _, s in tensors)
            mine.append(dict(canonical=canonical, src=me, dtype=str(out_dtype).removeprefix("torch."),
                             tensors=tensors, bytes=nbytes, expert=mapping.is_expert))
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    # Each weight comes from the replica of this rank's group for its kind (dense or expert); with
    # scope="world" that is the one exporting replica's, with scope="replica" this rank's own.
    groups = {kind: ctx.group_for(kind) for kind in (False, True)}
    members = {kind: set(dist.get_process_group_ranks(dist.group.WORLD if g is None else g))
               for kind, g in groups.items()}
    specs = sorted((s for part in everyone for s in part if s["src"] in members[s["expert"]]),
                   key=lambda s: _export_order(s["canonical"]))
    _check_complete(bridge, specs)
    return local, specs


@torch.no_grad()
def _transfer_bucket(bucket, local, bridge, ctx, me, receivers, staging, device):
    """Packs one bucket on its source rank and sends it; returns the receiver's ``(name, view)``s.

    A plain function, not part of the generator: nothing of a packed bucket (gathered tensors,
    views) outlives this call except the returned views, so at most one bucket is alive at a time.
    """
    src = bucket[0]["src"]
    group = ctx.group_for(bucket[0]["expert"])
    total = sum(s["bytes"] for s in bucket)
    receive = receivers == "all" or receivers == me
    buf = staging.get(total, device) if (me == src or receive) else None
    offset = 0
    views: List[Tuple[str, torch.Tensor]] = []
    for spec in bucket:
        out_dtype = getattr(torch, spec["dtype"])
        entry = local.get(spec["canonical"])
        outs = None
        if entry is not None and ctx.participates(entry[0].is_expert):
            mapping, hf_names, t = entry
            if not isinstance(t, torch.Tensor):  # computed on demand (a LoRA-merged weight)
                t = t.materialize()
            outs = mapping.to_hf(_gather_full(t, mapping, ctx), ctx.tp_for(mapping.is_expert)[1],
                                 bridge.arch, hf_names)
        for i, (name, shape) in enumerate(spec["tensors"]):
            n = torch.Size(shape).numel() * out_dtype.itemsize
            if buf is not None:
                view = buf[offset: offset + n].view(out_dtype).view(shape)
                if me == src:
                    view.view(outs[i][2].shape).copy_(outs[i][2])
                views.append((name, view))
            offset += _aligned(n)
        outs = None  # drop this tensor's gathered shards before the next one is gathered
    if receivers == "all":
        if dist.get_world_size(group) > 1:
            dist.broadcast(buf, src=src, group=group)
    elif src != receivers:
        if me == src:
            dist.send(buf, dst=receivers)
        elif me == receivers:
            dist.recv(buf, src=src)
    return views if receive else []


def _device_of(local: dict) -> torch.device:
    for _, _, t in local.values():
        return t.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_complete(bridge: Bridge, specs: List[dict]) -> None:
    produced = [n for s in specs for n, _ in s["tensors"]]
    expected = bridge.hf_names()
    if sorted(produced) != sorted(expected):
        missing = sorted(set(expected) - set(produced))[:5]
        extra = sorted(set(produced) - set(expected))[:5]
        dupes = sorted({n for n in produced if produced.count(n) > 1})[:5]
        raise RuntimeError(
            f"export would not produce the model's tensors exactly once: missing {missing}, "
            f"unexpected {extra}, duplicated {dupes}"
        )
