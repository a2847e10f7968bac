"""LoRA adapters on Megatron-Core's tensor-parallel linear layers, laid out as the bridge lays out weights.

Each targeted Megatron linear gets one :class:`LoraAdapter` (``module.lora``, parameters ``A`` and
``B``) and a forward hook that adds ``scale · B · A · x`` to the layer's output. The base weights are
frozen. Which HF modules a Megatron linear holds is the bridge's knowledge (``bridge/mappings.py``):

- **Column-parallel, fused** (``linear_qkv`` = q/k/v, ``linear_fc1`` = gate/up): the targeted roles
  share one adapter whose ``A`` stacks the roles' ``A`` matrices (``[roles · r, in]``, replicated on
  every TP rank) and whose ``B`` is the block matrix that gives each role's rows only its own ``A``'s
  block, laid out and split over TP exactly like the fused weight (the bridge's ``QKV`` / ``GatedMLP``
  mappings applied to ``B``). A fixed mask keeps the off-diagonal blocks zero, so the roles stay
  separate PEFT adapters through training. The input is the layer's input (all-gathered over the
  sequence under sequence parallelism, for the adapter only after ``A``).
- **Row-parallel** (``linear_proj`` = o_proj, ``linear_fc2`` = down_proj): ``A`` is split by input
  columns like the weight; the partial ``A · x`` is summed over TP before ``B`` (replicated), and under
  sequence parallelism the result is cut to this rank's sequence shard like the layer's output.

Gradients: column ``A`` is replicated, so its gradient is all-reduced over TP (by the
``copy_to_tensor_model_parallel_region`` before ``B`` without sequence parallelism; with it, by
Megatron's reduction of parameters marked ``sequence_parallel``). Row ``B`` sees the full output
gradient on every rank. Checked against transformers + ``peft`` in ``tests/test_lora.py``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_rlfp16.bridge.mappings import QKV
from megatron_rlfp16.lora.config import LoraConfig

# Megatron linear (below ``decoder.layers.<i>.``) -> its HF roles in the bridge mapping's order.
MODULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "self_attention.linear_qkv": (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")),
    "self_attention.linear_proj": (("w", "o_proj"),),
    "mlp.linear_fc1": (("gate", "gate_proj"), ("up", "up_proj")),
    "mlp.linear_fc2": (("w", "down_proj"),),
}
ROW_PARALLEL = ("self_attention.linear_proj", "mlp.linear_fc2")
PEFT_PREFIX = "base_model.model."


class LoraAdapter(torch.nn.Module):
    """The adapter of one Megatron linear; see the module docstring for the layout."""

    def __init__(self, *, roles: Tuple[str, ...], hf_modules: Dict[str, str], mapping, rank: int, scale: float,
                 dropout: float, row_parallel: bool, split_sequence: bool, in_features: int,
                 out_features: int, dtype, device):
        super().__init__()
        self.roles, self.hf_modules, self.mapping = roles, hf_modules, mapping
        self.r, self.scale, self.dropout = rank, scale, dropout
        self.row_parallel = row_parallel
        self.split_sequence = split_sequence  # the layer runs under sequence parallelism
        width = rank * len(roles)
        self.A = torch.nn.Parameter(torch.zeros(width, in_features, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(out_features, width, dtype=dtype, device=device))
        self.register_buffer("mask", None, persistent=False)
        if split_sequence and not row_parallel:
            # partial over the sequence shards: Megatron sums the gradients of params so marked over TP
            setattr(self.A, "sequence_parallel", True)
        for p in (self.A, self.B):
            p.lora = True

    def extra_repr(self) -> str:
        return f"roles={list(self.hf_modules.values())}, r={self.r}, scale={self.scale:g}"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        if self.dropout and self.training:
            x = F.dropout(x, p=self.dropout)
        h = F.linear(x.to(self.A.dtype), self.A)
        B = self.B if self.mask is None else self.B * self.mask
        if self.row_parallel:
            h = tp.reduce_from_tensor_model_parallel_region(h)
            y = F.linear(h, B)
            return tp.scatter_to_sequence_parallel_region(y) if self.split_sequence else y
        if self.split_sequence:
            h = tp.gather_from_sequence_parallel_region(h)
        else:
            h = tp.copy_to_tensor_model_parallel_region(h)
        return F.linear(h, B)


def _hook(module, args, kwargs, output):
    adapter = module.lora
    x = args[0] if args else kwargs["input_"]
    out, bias = output if isinstance(output, tuple) else (output, None)
    out = out + (adapter.scale * adapter.delta(x)).to(out.dtype)
    return (out, bias) if isinstance(output, tuple) else out


def _targets(model) -> List[Tuple[str, torch.nn.Module, str]]:
    """``(local name, module, key of MODULES)`` of every linear LoRA can adapt on this rank."""
    out = []
    for name, module in model.named_modules():
        for key in MODULES:
            if name.endswith(key) and ".experts." not in name:
                out.append((name, module, key))
    return out


def apply_lora(model, arch, config: LoraConfig, *, seed: int = 0) -> Dict[str, LoraAdapter]:
    """Adds adapters to this rank's ``GPTModel`` (bare or wrapped, before Megatron DDP wraps it) and
    freezes every other parameter. Returns ``{local module name: adapter}``. ``A`` starts as PEFT's
    (Kaiming-uniform, from ``seed``, the same on every rank), ``B`` at zero: the model is unchanged
    until the first update."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_rlfp16.bridge import Bridge
    from megatron_rlfp16.bridge.context import ShardContext, unwrap
    from megatron_rlfp16.bridge.names import to_canonical

    config.validate(family=arch.family, is_moe=arch.is_moe)
    if not config.enabled:
        raise ValueError("apply_lora with LoraConfig.rank=0: nothing to add")
    bare = unwrap(model)
    if getattr(bare, "_rlfp16_lora", None):
        raise ValueError("this model already has LoRA adapters")
    ctx = ShardContext.from_megatron(bare)
    if config.dropout and ctx.tp_size > 1:
        raise ValueError(f"LoraConfig.dropout={config.dropout} with tensor parallelism {ctx.tp_size}: the column "
                         "adapters' replicated input would draw a different dropout mask on each rank; "
                         "valid: dropout 0 with TP > 1")
    bridge = Bridge(arch)
    wanted = set(config.targets_for(arch.is_moe))
    adapters: Dict[str, LoraAdapter] = {}
    for p in bare.parameters():
        p.requires_grad_(False)
    for name, module, key in _targets(bare):
        roles = tuple((role, hf) for role, hf in MODULES[key] if hf in wanted)
        if not roles:
            continue
        row = key in ROW_PARALLEL
        if not isinstance(module, RowParallelLinear if row else ColumnParallelLinear):
            raise ValueError(f"{name} is a {type(module).__name__}: LoRA adapts Megatron's local-spec "
                             "ColumnParallelLinear / RowParallelLinear (TransformerEngine layers that fuse the "
                             "input norm are not supported yet); build the model with spec='local'")
        canonical = to_canonical(f"{name}.weight", layer_offset=ctx.layer_offset)
        mapping, hf_names = bridge.resolve(canonical)
        weight = module.weight
        out_features, in_features = weight.shape
        adapter = LoraAdapter(
            roles=tuple(role for role, _ in roles), hf_modules={role: hf_names[role][: -len(".weight")]
                                                                for role, _ in roles},
            mapping=mapping, rank=config.rank, scale=config.scale, dropout=config.dropout, row_parallel=row,
            split_sequence=bool(getattr(module, "sequence_parallel", False)), in_features=in_features,
            out_features=out_features, dtype=weight.dtype, device=weight.device)
        if not row:
            adapter.mask = _column_blocks(adapter, ctx, arch, ones=True).to(weight.dtype)
        _init_A(adapter, ctx, seed, canonical)
        module.lora = adapter
        module.register_forward_hook(_hook, with_kwargs=True)
        _shard_in_checkpoints(module, adapter, gated=key == "mlp.linear_fc1" and bool(getattr(
            bare.config, "gated_linear_unit", False)))
        adapters[name] = adapter
    if not adapters:
        raise ValueError(f"no module of this rank matches LoraConfig.target_modules={sorted(wanted)}")
    bare._rlfp16_lora = dict(config=config, adapters=adapters)
    return adapters


def _shard_in_checkpoints(module, adapter: LoraAdapter, *, gated: bool) -> None:
    """Megatron's linears put every state-dict entry other than ``weight``/``bias`` in checkpoints
    as replicated over TP, which would keep one rank's shard of ``B`` (column) or ``A`` (row) for
    all. The adapted linear's ``sharded_state_dict`` shards them like the weight instead: column
    ``B`` by rows (split into its gate and up halves for a fused SwiGLU ``fc1``, as Megatron splits
    the weight), row ``A`` by columns; the replicated halves stay replicated. The concatenated
    shards are then independent of the TP size, as the weights' are."""
    original = module.sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = original(prefix, sharded_offsets, metadata)
        for name in ("lora.A", "lora.B"):
            out.pop(prefix + name, None)
        axis = {"lora.A": 1} if adapter.row_parallel else {"lora.B": 0}
        mine = make_sharded_tensors_for_checkpoint(
            {"lora.A": adapter.A, "lora.B": adapter.B}, prefix, axis, sharded_offsets,
            tp_group=module.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if gated:
            key = prefix + "lora.B"
            mine[key] = apply_swiglu_sharded_factory(mine[key], sharded_offsets,
                                                     (metadata or {}).get("singleton_local_shards", False))
        out.update(mine)
        return out

    module.sharded_state_dict = sharded_state_dict


def _init_A(adapter: LoraAdapter, ctx, seed: int, canonical: str) -> None:
    """PEFT's initialization of each role's ``A`` (Kaiming-uniform, a = sqrt(5): bound 1/sqrt(in)),
    drawn in full from a generator seeded by the module's global name, then this rank's share."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, canonical)) * 7919 + len(canonical))
    full_in = adapter.A.shape[1] * (ctx.tp_size if adapter.row_parallel else 1)
    bound = 1.0 / math.sqrt(full_in)
    full = (torch.rand(adapter.A.shape[0], full_in, generator=g) * 2 - 1) * bound
    if adapter.row_parallel:
        full = full.chunk(ctx.tp_size, dim=1)[ctx.tp_rank]
    with torch.no_grad():
        adapter.A.copy_(full)


def _column_blocks(adapter: LoraAdapter, ctx, arch, *, ones: bool = False,
                   hf: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """This rank's ``B`` (``[out_local, roles · r]``) for role matrices ``hf`` (``{role: [out_role, r]}``),
    or the mask of its diagonal blocks with ``ones``: each role's rows carry its ``B`` in its own
    column block; the bridge's mapping lays the rows out and splits them over TP like the weight."""
    r, n = adapter.r, len(adapter.roles)
    rows = _role_rows(adapter, arch)
    parts = {}
    for role in adapter.mapping.hf:  # every role of the fused layer: untargeted ones stay zero
        block = torch.zeros(rows[role], r * n)
        if role in adapter.roles:
            i = adapter.roles.index(role)
            block[:, i * r:(i + 1) * r] = 1.0 if ones else hf[role]
        parts[role] = block
    return adapter.mapping.to_megatron(parts, ctx.tp_rank, ctx.tp_size, arch)


def _role_rows(adapter: LoraAdapter, arch) -> Dict[str, int]:
    """Output rows of each HF role of a fused column-parallel layer."""
    if isinstance(adapter.mapping, QKV):
        groups, per_group, d = QKV._dims(arch)
        return dict(q=groups * per_group * d, k=groups * d, v=groups * d)
    f = arch.ffn_hidden_size
    return dict(gate=f, up=f)


# ---- PEFT tensors in and out ---------------------------------------------------------------------

def _adapters(model) -> Dict[str, LoraAdapter]:
    from megatron_rlfp16.bridge.context import unwrap

    state = getattr(unwrap(model), "_rlfp16_lora", None)
    if not state:
        raise ValueError("this model has no LoRA adapters (apply_lora first)")
    return state["adapters"]


def peft_names(hf_module: str) -> Tuple[str, str]:
    """PEFT's tensor names of one adapted HF module (``model.layers.0.self_attn.q_proj``)."""
    return (f"{PEFT_PREFIX}{hf_module}.lora_A.weight", f"{PEFT_PREFIX}{hf_module}.lora_B.weight")


def load_lora_state_dict(model, arch, tensors: Dict[str, torch.Tensor]) -> int:
    """Sets this rank's adapters from PEFT-named tensors (``adapter_model.safetensors``: ``lora_A``
    ``[r, in]`` and ``lora_B`` ``[out, r]`` per HF module), each rank taking its share. Returns the
    number of tensors used; a missing one is an error naming it."""
    from megatron_rlfp16.bridge.context import ShardContext

    ctx = ShardContext.from_megatron(model)
    used = 0
    for name, adapter in _adapters(model).items():
        As, Bs = {}, {}
        for role, hf_module in adapter.hf_modules.items():
            a_name, b_name = peft_names(hf_module)
            for key in (a_name, b_name):
                if key not in tensors:
                    raise KeyError(f"the adapter tensors have no {key!r} (module {name}, rank {adapter.r})")
            As[role], Bs[role] = tensors[a_name], tensors[b_name]
            if tuple(As[role].shape[:1]) != (adapter.r,) or Bs[role].shape[1] != adapter.r:
                raise ValueError(f"{a_name} {tuple(As[role].shape)} / {b_name} {tuple(Bs[role].shape)}: rank "
                                 f"{adapter.r} expected (LoraConfig.rank)")
            used += 2
        A = torch.cat([As[role] for role in adapter.roles], dim=0)
        if adapter.row_parallel:
            A = A.chunk(ctx.tp_size, dim=1)[ctx.tp_rank]
            B = Bs[adapter.roles[0]]
        else:
            B = _column_blocks(adapter, ctx, arch, hf=Bs)
        with torch.no_grad():
            adapter.A.copy_(A)
            adapter.B.copy_(B)
    return used


def lora_state_dict(model, arch, *, grads: bool = False, copy: bool = True) -> Dict[str, torch.Tensor]:
    """Collective over the tensor-parallel group: every rank returns the PEFT-named tensors of its
    pipeline stage's adapters, whole (TP shards gathered; fused rows split back into their HF modules).
    ``grads``: the adapters' gradients (Megatron DDP's ``main_grad``) in the same layout. ``copy=False``:
    views where no gather was needed (they change with the adapters), for a caller that copies
    them at once (the adapter sync)."""
    import torch.distributed as dist

    from megatron_rlfp16.bridge.context import ShardContext

    ctx = ShardContext.from_megatron(model)
    out: Dict[str, torch.Tensor] = {}
    for name, adapter in _adapters(model).items():
        A, B = (adapter.A.main_grad, adapter.B.main_grad) if grads else (adapter.A.detach(), adapter.B.detach())
        if ctx.tp_size > 1:
            gather = B if not adapter.row_parallel else A
            parts = [torch.empty_like(gather) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, gather.contiguous(), group=ctx.tp_group)
            if adapter.row_parallel:
                A = torch.cat(parts, dim=1)
            else:
                B = torch.cat(parts, dim=0)
        r = adapter.r
        if adapter.row_parallel:
            (hf_module,) = adapter.hf_modules.values()
            a_name, b_name = peft_names(hf_module)
            out[a_name], out[b_name] = (A.clone(), B.clone()) if copy else (A, B)
            continue
        roles = {role: role for role in adapter.mapping.hf}  # to_hf names its parts by role here
        for role, _, rows in adapter.mapping.to_hf(B, ctx.tp_size, arch, roles):
            if role not in adapter.hf_modules:
                continue
            i = adapter.roles.index(role)
            a_name, b_name = peft_names(adapter.hf_modules[role])
            a, b = A[i * r:(i + 1) * r], rows.reshape(-1, B.shape[1])[:, i * r:(i + 1) * r]
            out[a_name], out[b_name] = (a.clone(), b.clone()) if copy else (a, b)
    return out


def trainable_parameters(model) -> List[torch.nn.Parameter]:
    return [p for adapter in _adapters(model).values() for p in (adapter.A, adapter.B)]


def lora_config_of(model) -> Optional[LoraConfig]:
    """The ``LoraConfig`` a model's adapters were made with; None for a model without LoRA."""
    from megatron_rlfp16.bridge.context import unwrap

    state = getattr(unwrap(model), "_rlfp16_lora", None)
    return state["config"] if state else None


class MergedWeight:
    """``W + scale · B · A`` of one adapted linear, computed in FP32 when the export reaches it
    (``bridge.core`` takes it where it takes a tensor: ``shape``, ``dtype``, ``device``,
    ``materialize()``), so that a merged export holds one merged weight at a time."""

    def __init__(self, module):
        self.module = module
        w = module.weight
        self.shape, self.dtype, self.device = w.shape, w.dtype, w.device

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        adapter, w = self.module.lora, self.module.weight
        B = adapter.B if adapter.mask is None else adapter.B * adapter.mask
        return torch.addmm(w.float(), B.float(), adapter.A.float(), alpha=adapter.scale)


def merged_named_parameters(model):
    """``named_parameters()`` of the bare model with every adapted linear's ``weight`` replaced by its
    :class:`MergedWeight` (the adapters themselves are skipped by the bridge's names)."""
    from megatron_rlfp16.bridge.context import unwrap

    bare = unwrap(model)
    merged = {f"{name}.weight": MergedWeight(module) for name, module in bare.named_modules()
              if isinstance(getattr(module, "lora", None), LoraAdapter)}
    for name, param in bare.named_parameters():
        yield name, merged.get(name, param)
