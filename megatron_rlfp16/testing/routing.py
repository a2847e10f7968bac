"""An independent reference for routing replay: transformers' own MoE blocks, routed by given experts.

:func:`hf_model_routed_by` returns a transformers model whose every MoE router takes its top-k from
given routes (``[B, S, L, K]``, ``megatron_rlfp16.routing``'s layout) instead of choosing; the experts,
their weighting (softmax over all experts, renormalized over the chosen ones when the config says so)
and everything else are transformers' code. Positions without a route keep the router's choice.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE
from megatron_rlfp16.routing import NO_ROUTE


def _routed_gate_forward(gate, hidden_states):
    hidden = hidden_states.reshape(-1, gate.hidden_dim)
    logits = F.linear(hidden, gate.weight)
    probs = torch.softmax(logits.float(), dim=-1)
    own = torch.topk(probs, gate.top_k, dim=-1).indices
    given = gate.given_routes
    if given is None:
        chosen = own
    else:
        given = given.reshape(-1, given.shape[-1]).to(own.device).long()
        chosen = torch.where(given >= 0, given, own)
    weights = probs.gather(1, chosen)
    if getattr(gate, "norm_topk_prob", True):  # Mixtral always renormalizes
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), chosen


def hf_model_routed_by(hf_dir: str, dtype=ACCUM_DTYPE):
    """``(model, set_routes)``: ``set_routes(routes [B, S, L, K] or None)`` before each forward."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    gates = {}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            gate = getattr(getattr(layer, "block_sparse_moe", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            gate.given_routes = None
            gate.forward = types.MethodType(_routed_gate_forward, gate)
            gates[i] = gate

    def set_routes(routes):
        for i, gate in gates.items():
            gate.given_routes = None if routes is None else routes[:, :, i]

    if not gates:
        raise ValueError(f"{hf_dir}: no MoE router found")
    return model, set_routes


def random_routes(batch: int, seq: int, layers: int, topk: int, num_experts: int, *, seed: int = 0,
                  lengths=None) -> torch.Tensor:
    """Random distinct experts per (token, layer) — almost surely not what any router would choose —
    with ``NO_ROUTE`` from ``lengths[b] - 1`` on (the last token and padding, as the engine leaves them)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, seq, layers, num_experts, generator=g)
    routes = scores.topk(topk, dim=-1).indices.to(torch.int16)
    if lengths is not None:
        for b, n in enumerate(lengths):
            routes[b, max(n - 1, 0):] = NO_ROUTE
    return routes


def checkpoint_named_grads(model) -> dict:
    """The gradients of a transformers Qwen3-MoE or Mixtral model under their checkpoint names (the
    bridge's export names): fused expert tensors split per expert, Mixtral's ``block_sparse_moe``."""
    mixtral = model.config.model_type == "mixtral"
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach()
        if ".mlp.experts." in name:
            prefix = name.split(".mlp.experts.")[0] + (".block_sparse_moe.experts." if mixtral else ".mlp.experts.")
            if name.endswith("gate_up_proj"):
                gate, up = g.chunk(2, dim=1)
                for e in range(g.shape[0]):
                    out[f"{prefix}{e}.{'w1' if mixtral else 'gate_proj'}.weight"] = gate[e]
                    out[f"{prefix}{e}.{'w3' if mixtral else 'up_proj'}.weight"] = up[e]
            else:
                for e in range(g.shape[0]):
                    out[f"{prefix}{e}.{'w2' if mixtral else 'down_proj'}.weight"] = g[e]
            continue
        if mixtral and ".mlp.gate." in name:
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        out[name] = g
    return out


def make_near_tie_moe(family: str, out_dir: str, *, seed: int = 0, eps: float = 1e-3, expert_gain: float = 4.0,
                      tied: int = 2, **config) -> str:
    """A tiny MoE checkpoint whose routers nearly tie: in every layer, experts 1 .. ``tied`` have router
    rows equal to expert 1's up to ``eps`` (relative), so wherever the choice falls among them a
    rounding difference between two engines flips it; their weights are scaled by ``expert_gain`` so
    a flip moves the output visibly. ``config``: overrides of the tiny config (e.g. more layers, where
    the rounding differences that flip a choice grow). For testing routing replay."""
    from safetensors.torch import load_file, save_file

    from megatron_rlfp16.testing.tiny import make_tiny_model

    make_tiny_model(family, out_dir, seed=seed, **config)
    path = f"{out_dir}/model.safetensors"
    weights = load_file(path)
    g = torch.Generator().manual_seed(seed + 1)
    for name in list(weights):
        w = weights[name]
        if name.endswith("gate.weight") and w.dim() == 2:
            w = w.clone() * 4.0
            for e in range(2, tied + 1):
                w[e] = w[1] * (1 + eps * torch.randn(w.shape[1], generator=g))
            weights[name] = w
        elif any(f".experts.{e}." in name for e in range(1, tied + 1)):
            weights[name] = w * expert_gain
    save_file(weights, path, metadata={"format": "pt"})
    return out_dir
