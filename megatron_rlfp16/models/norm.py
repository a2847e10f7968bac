"""RMSNorm for the local (non-TransformerEngine) spec.

Megatron-Core's torch fallback norm refuses sequence parallelism, which MoE under TP requires, and
computes in the input dtype. This one normalizes in FP32 and casts back before the weight, the same
order as the Hugging Face reference and vLLM, so FP16 training sees the rollout engine's numerics.
Its weight carries ``sequence_parallel`` so Megatron all-reduces its gradient across TP under SP.
"""
from __future__ import annotations

import dataclasses

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def with_rms_norm(layer_spec):
    """Returns a copy of a local-spec layer ``ModuleSpec`` whose norms are :class:`RMSNorm`."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    sub = layer_spec.submodules
    changes = {f: RMSNorm for f in ("input_layernorm", "pre_mlp_layernorm") if _is_norm(getattr(sub, f, None))}
    attn = sub.self_attention
    attn_sub = attn.submodules
    attn_changes = {f: RMSNorm for f in ("q_layernorm", "k_layernorm") if _is_norm(getattr(attn_sub, f, None))}
    if attn_changes:
        changes["self_attention"] = ModuleSpec(
            module=attn.module, params=attn.params,
            submodules=dataclasses.replace(attn_sub, **attn_changes),
        )
    return ModuleSpec(module=layer_spec.module, params=layer_spec.params,
                      submodules=dataclasses.replace(sub, **changes))


def _is_norm(x) -> bool:
    """A norm slot that is filled (not absent, not Megatron's IdentityOp placeholder)."""
    from megatron.core.transformer.identity_op import IdentityOp

    return x is not None and x is not IdentityOp
