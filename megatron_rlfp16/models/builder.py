"""Hugging Face config -> Megatron-Core ``TransformerConfig`` and ``GPTModel``.

The layer spec is TransformerEngine's when TE imports on a GPU, else Megatron-Core's local spec; both
name their parameters differently, and the bridge understands both (``bridge/names.py``).
The model is built for the calling rank's place in the current parallel layout
(``megatron_rlfp16.runtime.init_runtime`` must have run).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from megatron_rlfp16.models.hf_config import ModelArch, check_layout, parse_hf_config
from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE, ROUTER_DTYPE, Precision
from megatron_rlfp16.models.norm import RMSNorm, with_rms_norm

SPECS = ("auto", "local", "te")


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def uses_sequence_parallel(arch: ModelArch, tp: int) -> bool:
    """Megatron refuses to train MoE under TP without sequence parallelism (every TP rank would
    repeat each token's expert work), so MoE with tp > 1 turns it on; dense models keep it off."""
    return arch.is_moe and tp > 1


def default_expert_tp(arch: ModelArch, tp: int, ep: int = 1) -> int:
    """Expert tensor parallelism when none is given: 1 for MoE with expert parallelism (each expert
    whole on a rank, its state sharded over the expert-data-parallel ranks instead of being split by
    the attention's TP), ``tp`` otherwise (Megatron's default). With ep=1 it must be ``tp``: Megatron
    reduces expert gradients over the expert-data-parallel group only when ep > 1
    (``ParallelConfig.validate``)."""
    return 1 if arch.is_moe and ep > 1 else tp


def sequence_multiple(arch: ModelArch, tp: int) -> int:
    """What every sequence length fed to the model must be a multiple of: ``tp`` under sequence
    parallelism (the sequence is split over the TP ranks), else 1. The one owner of this rule."""
    return tp if uses_sequence_parallel(arch, tp) else 1


def model_sequence_multiple(model) -> int:
    """``sequence_multiple`` of an already built (possibly wrapped) model, read from its config."""
    while hasattr(model, "module"):
        model = model.module
    config = model.config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def transformer_config(
    arch: ModelArch,
    *,
    params_dtype: Union[torch.dtype, str, Precision] = Precision.FP32,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    ep: Optional[int] = None,
    etp: Optional[int] = None,
    overrides: Optional[Mapping[str, Any]] = None,
):
    """The Megatron ``TransformerConfig`` of ``arch`` for the current (or given) parallel layout.

    ``overrides`` are applied last (e.g. FP16 settings from ``PrecisionConfig``); an unknown key is an
    error naming it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    precision = Precision.parse(params_dtype, field="params_dtype")
    params_dtype = precision.torch_dtype
    tp = tp or ps.get_tensor_model_parallel_world_size()
    pp = pp or ps.get_pipeline_model_parallel_world_size()
    ep = ep or ps.get_expert_model_parallel_world_size()
    etp = etp or (ps.get_expert_tensor_parallel_world_size() if ps.model_parallel_is_initialized() else tp)
    check_layout(arch, tp=tp, pp=pp, ep=ep)
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        # RL training and every parity check want deterministic, dropout-free layers.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=uses_sequence_parallel(arch, tp),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        fp16=precision == Precision.FP16,
        bf16=precision == Precision.BF16,
        use_cpu_initialization=not on_gpu,
    )
    if arch.is_moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # pre-softmax: softmax over all experts, then top-k, no renormalization (Qwen3-MoE with
            # norm_topk_prob=False); otherwise top-k logits then softmax == renormalized top-k.
            moe_router_pre_softmax=not arch.moe_renormalize,
            moe_router_score_function="softmax",
            moe_router_dtype=ROUTER_DTYPE,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # gloo cannot run the all-to-all dispatcher; allgather is exact, just less scalable.
            moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    for key, value in (overrides or {}).items():
        if key not in {f.name for f in dataclasses.fields(TransformerConfig)}:
            raise ValueError(f"TransformerConfig override {key!r} is not a TransformerConfig field")
        kwargs[key] = value
    return TransformerConfig(**kwargs)


def layer_spec(arch: ModelArch, spec: str = "auto"):
    """The decoder layer ``ModuleSpec``: TransformerEngine's or the local (pure torch) one."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec not in SPECS:
        raise ValueError(f"spec={spec!r} is not valid; valid: {SPECS}")
    use_te = te_available() if spec == "auto" else spec == "te"
    kwargs = dict(num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm)
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    return with_rms_norm(gpt_layer_specs.get_gpt_layer_local_spec(**kwargs, normalization="RMSNorm"))


def block_spec(arch: ModelArch, config, spec: str = "auto"):
    """This stage's ``TransformerBlockSubmodules``; on the local spec the final norm is our RMSNorm."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = layer_spec(arch, spec)
    if layer.submodules.input_layernorm is not RMSNorm:
        return layer  # TransformerEngine: Megatron picks its own final norm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm
    )


def build_model(
    hf_config: Mapping[str, Any] | ModelArch,
    *,
    params_dtype: Union[torch.dtype, str, Precision] = Precision.FP32,
    spec: str = "auto",
    parallel_output: bool = True,
    config_overrides: Optional[Mapping[str, Any]] = None,
):
    """Builds this rank's ``GPTModel`` for ``hf_config`` (a config.json dict, a PretrainedConfig or a
    ``ModelArch``). Returns ``(model, arch)``. Weights are random until the bridge loads them."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    arch = hf_config if isinstance(hf_config, ModelArch) else parse_hf_config(hf_config)
    params_dtype = Precision.parse(params_dtype, field="params_dtype").torch_dtype
    config = transformer_config(arch, params_dtype=params_dtype, overrides=config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(arch, config, spec),
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
    )
    if params_dtype != ACCUM_DTYPE:
        model = model.to(params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, arch


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean attention mask (True = masked) of shape [1, 1, s, s]; passing it explicitly
    avoids the default mask that Megatron builds on CUDA."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
