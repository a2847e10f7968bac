"""``Precision`` and ``PrecisionConfig``: every mapping field by field, every bad input by its message.

The Megatron side is checked on the real ``TransformerConfig`` / ``OptimizerConfig`` /
``DistributedDataParallelConfig`` the settings build, and the vLLM side on the ``ModelConfig`` that
vLLM's own ``EngineArgs`` resolves from them. Training with these settings is tests/test_fp16_training.py.
"""
import dataclasses
import json

import pytest
import torch

from megatron_rlfp16.precision import (
    DEFAULT_INITIAL_LOSS_SCALE,
    Precision,
    PrecisionConfig,
)


# -- Precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("fp16", Precision.FP16), ("float16", Precision.FP16), ("half", Precision.FP16),
    ("F16", Precision.FP16), ("torch.float16", Precision.FP16), (torch.float16, Precision.FP16),
    ("bf16", Precision.BF16), ("BFloat16", Precision.BF16), (torch.bfloat16, Precision.BF16),
    ("fp32", Precision.FP32), ("float32", Precision.FP32), ("float", Precision.FP32),
    (" fp32 ", Precision.FP32), (torch.float32, Precision.FP32), (Precision.BF16, Precision.BF16),
])
def test_precision_parses_names_and_dtypes(value, expected):
    assert Precision.parse(value) is expected


def test_precision_dtypes():
    assert [(p.torch_dtype, p.vllm_dtype) for p in Precision] == [
        (torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
    ]
    assert [p.value for p in Precision] == ["fp16", "bf16", "fp32"]


@pytest.mark.parametrize("value", ["fp8", "int8", "", torch.float64, 16, None])
def test_precision_rejects_unknown_values_listing_valid_ones(value):
    with pytest.raises(ValueError) as e:
        Precision.parse(value, field="PrecisionConfig.trainer")
    message = str(e.value)
    assert f"PrecisionConfig.trainer={value!r} is not a precision" in message
    for name in ("'fp16'", "'float16'", "'half'", "'bf16'", "'bfloat16'", "'fp32'", "'float32'"):
        assert name in message


# -- defaults and normalization ------------------------------------------------------------------


def test_defaults_are_fp16_both_sides_with_dynamic_scaling():
    c = PrecisionConfig()
    assert c.trainer is Precision.FP16 and c.rollout is None and c.rollout_precision is Precision.FP16
    assert c.dynamic_loss_scaling
    resolved = {f: c.resolved(f) for f in ("initial_loss_scale", "min_loss_scale", "loss_scale_window",
                                          "hysteresis", "growth_factor", "backoff_factor")}
    assert resolved == dict(initial_loss_scale=32768.0, min_loss_scale=1.0, loss_scale_window=1000,
                            hysteresis=2, growth_factor=2.0, backoff_factor=0.5)
    assert DEFAULT_INITIAL_LOSS_SCALE == 2.0**15
    assert (c.fp32_logits, c.fp32_router, c.fp32_attention_softmax, c.fp32_grad_reduce) == (True,) * 4
    assert c.grad_clip == 1.0
    with pytest.raises(ValueError, match="resolved\\('loss_scale'\\): valid fields are"):
        c.resolved("loss_scale")


def test_names_are_normalized_and_the_config_serializes():
    c = PrecisionConfig(trainer="half", rollout="float16").validate()
    assert c.trainer is Precision.FP16 and c.rollout is Precision.FP16
    assert json.loads(json.dumps(dataclasses.asdict(c)))["trainer"] == "fp16"


def test_validate_runs_again_after_overrides_and_every_method_validates():
    c = PrecisionConfig()
    c.trainer = "bf16"
    assert c.validate() is c and c.trainer is Precision.BF16 and not c.dynamic_loss_scaling
    c.hysteresis = 3
    with pytest.raises(ValueError, match="hysteresis=3 set with trainer='bf16'"):
        c.validate()
    c = PrecisionConfig()
    c.rollout = "bf16"
    for method in (c.vllm_kwargs, c.optimizer_kwargs, c.transformer_overrides, c.ddp_kwargs):
        with pytest.raises(ValueError, match="allow_mismatched_precision=True"):
            method()


# -- bad inputs ----------------------------------------------------------------------------------


BAD = [
    (dict(trainer="fp8"), ["PrecisionConfig.trainer='fp8' is not a precision", "'half'", "'bf16'"]),
    (dict(rollout="int8"), ["PrecisionConfig.rollout='int8' is not a precision", "'fp32'"]),
    (dict(trainer="bf16", rollout="fp32"),
     ["rollout='fp32' differs from trainer='bf16'", "rollout=None", "allow_mismatched_precision=True",
      "BF16 training with FP32 rollout"]),
    (dict(trainer="fp16", rollout="bf16"), ["rollout='bf16' differs from trainer='fp16'"]),
    (dict(allow_mismatched_precision=1), ["allow_mismatched_precision=1 is invalid", "True or False"]),
    (dict(trainer="bf16", initial_loss_scale=1024.0),
     ["initial_loss_scale=1024.0 set with trainer='bf16'", "only applies to an fp16 trainer",
      "set trainer='fp16'"]),
    (dict(trainer="fp32", loss_scale=128.0, hysteresis=1),
     ["loss_scale=128.0, hysteresis=1 set with trainer='fp32'", "Remove them"]),
    (dict(loss_scale=0.0), ["loss_scale=0.0 is invalid", "None (dynamic scaling) or a finite number > 0"]),
    (dict(loss_scale=-8.0), ["loss_scale=-8.0 is invalid"]),
    (dict(loss_scale=float("inf")), ["loss_scale=inf is invalid"]),
    (dict(loss_scale=True), ["loss_scale=True is invalid"]),
    (dict(loss_scale=128.0, min_loss_scale=1.0, loss_scale_window=10),
     ["min_loss_scale=1.0, loss_scale_window=10 belong to the dynamic scaler", "loss_scale=128.0",
      "loss_scale=None"]),
    (dict(initial_loss_scale=0.0), ["initial_loss_scale=0.0 is invalid", "finite number > 0"]),
    (dict(min_loss_scale=-1.0), ["min_loss_scale=-1.0 is invalid"]),
    (dict(initial_loss_scale=1024.0, min_loss_scale=4096.0),
     ["min_loss_scale=4096.0 is above initial_loss_scale=1024.0",
      "valid: min_loss_scale <= initial_loss_scale"]),
    (dict(initial_loss_scale=0.5),
     ["min_loss_scale=1.0 (the default) is above initial_loss_scale=0.5"]),
    (dict(loss_scale_window=0), ["loss_scale_window=0 is invalid", "an integer >= 1"]),
    (dict(loss_scale_window=2.5), ["loss_scale_window=2.5 is invalid"]),
    (dict(hysteresis=0), ["hysteresis=0 is invalid", "an integer >= 1"]),
    (dict(hysteresis=True), ["hysteresis=True is invalid"]),
    (dict(growth_factor=1.0), ["growth_factor=1.0 is invalid", "a finite number > 1"]),
    (dict(backoff_factor=1.0), ["backoff_factor=1.0 is invalid", "a number in (0, 1)"]),
    (dict(backoff_factor=0.0), ["backoff_factor=0.0 is invalid"]),
    (dict(grad_clip=0.0), ["grad_clip=0.0 is invalid", "None (no clipping) or a finite number > 0"]),
    (dict(grad_clip=float("nan")), ["grad_clip=nan is invalid"]),
    (dict(fp32_logits="yes"), ["fp32_logits='yes' is invalid", "True or False"]),
    (dict(fp32_grad_reduce=None), ["fp32_grad_reduce=None is invalid"]),
]


@pytest.mark.parametrize("kwargs,needles", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_input_is_named_with_its_value_and_what_is_valid(kwargs, needles):
    config = PrecisionConfig(**kwargs)  # construction never raises: fields may come in any order
    with pytest.raises(ValueError) as e:
        config.validate()
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_the_paper_ablation_is_allowed_explicitly():
    c = PrecisionConfig(trainer="bf16", rollout="fp32", allow_mismatched_precision=True)
    assert (c.trainer, c.rollout_precision) == (Precision.BF16, Precision.FP32)


# -- Megatron TransformerConfig ------------------------------------------------------------------


def _arch(family="llama"):
    from megatron_rlfp16.models import parse_hf_config
    from megatron_rlfp16.testing.tiny import tiny_config

    return parse_hf_config(tiny_config(family).to_dict())


def _transformer_config(precision, family="llama", extra=None):
    from megatron_rlfp16.models import transformer_config

    return transformer_config(_arch(family), params_dtype=precision.trainer.torch_dtype, tp=1, pp=1,
                              ep=1, etp=1, overrides=precision.transformer_overrides(extra))


@pytest.mark.parametrize("trainer,fp16,bf16,dtype", [
    ("fp16", True, False, torch.float16),
    ("bf16", False, True, torch.bfloat16),
    ("fp32", False, False, torch.float32),
])
def test_transformer_overrides_field_by_field(trainer, fp16, bf16, dtype):
    c = PrecisionConfig(trainer=trainer)
    assert c.transformer_overrides() == dict(
        fp16=fp16, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        attention_softmax_in_fp32=True, moe_router_dtype="fp32",
    )
    config = _transformer_config(c, "qwen3_moe")
    assert (config.fp16, config.bf16, config.params_dtype, config.pipeline_dtype) == (fp16, bf16, dtype, dtype)
    assert config.attention_softmax_in_fp32 and config.moe_router_dtype == "fp32"


def test_transformer_islands_can_be_turned_off():
    c = PrecisionConfig(fp32_router=False, fp32_attention_softmax=False)
    overrides = c.transformer_overrides()
    assert overrides["moe_router_dtype"] is None and overrides["attention_softmax_in_fp32"] is False
    config = _transformer_config(c, "qwen3_moe")
    assert config.moe_router_dtype is None and config.attention_softmax_in_fp32 is False


def test_transformer_extra_is_merged():
    c = PrecisionConfig()
    overrides = c.transformer_overrides({"hidden_dropout": 0.0, "moe_grouped_gemm": False})
    assert overrides["hidden_dropout"] == 0.0 and overrides["fp16"] is True
    assert PrecisionConfig(trainer="bf16").transformer_overrides({"moe_grouped_gemm": True})["moe_grouped_gemm"]


@pytest.mark.parametrize("config,extra,needles", [
    (dict(), {"no_such_field": 1}, ["'no_such_field' is not a TransformerConfig field"]),
    (dict(), {"fp16": False}, ["fp16=False is set by PrecisionConfig", "trainer='fp16'"]),
    (dict(), {"params_dtype": torch.bfloat16}, ["params_dtype=torch.bfloat16 is set by PrecisionConfig"]),
    (dict(), {"fp8": "e4m3"}, ["fp8='e4m3' would run the trainer's GEMMs in FP8", "float16",
                               "valid: fp8=None"]),
    (dict(trainer="bf16"), {"fp4": "e2m1"}, ["fp4='e2m1'", "bfloat16", "valid: fp4=None"]),
    (dict(fp32_attention_softmax=False), {"apply_query_key_layer_scaling": True},
     ["apply_query_key_layer_scaling=True", "attention_softmax_in_fp32=True",
      "fp32_attention_softmax=False"]),
    (dict(), {"moe_grouped_gemm": True},
     ["moe_grouped_gemm=True with trainer='fp16'", "GroupedMLP", "only supports bf16",
      "valid: moe_grouped_gemm=False"]),
])
def test_transformer_extra_errors(config, extra, needles):
    with pytest.raises(ValueError) as e:
        PrecisionConfig(**config).transformer_overrides(extra)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


# -- Megatron DDP and optimizer ------------------------------------------------------------------


@pytest.mark.parametrize("config,expected", [
    (dict(), dict(grad_reduce_in_fp32=True, check_for_nan_in_grad=False)),
    (dict(loss_scale=1024.0), dict(grad_reduce_in_fp32=True, check_for_nan_in_grad=True)),
    (dict(trainer="bf16", fp32_grad_reduce=False), dict(grad_reduce_in_fp32=False, check_for_nan_in_grad=True)),
    (dict(trainer="fp32"), dict(grad_reduce_in_fp32=True, check_for_nan_in_grad=True)),
])
def test_ddp_kwargs_field_by_field(config, expected):
    from megatron.core.distributed import DistributedDataParallelConfig

    kwargs = PrecisionConfig(**config).ddp_kwargs()
    assert kwargs == expected
    ddp_config = DistributedDataParallelConfig(**kwargs)
    assert all(getattr(ddp_config, k) == v for k, v in expected.items())


@pytest.mark.parametrize("config,expected", [
    (dict(), dict(fp16=True, bf16=False, params_dtype=torch.float16, clip_grad=1.0, loss_scale=None,
                  initial_loss_scale=32768.0, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2)),
    (dict(initial_loss_scale=4096.0, min_loss_scale=2.0, loss_scale_window=50, hysteresis=1, grad_clip=0.5),
     dict(fp16=True, bf16=False, params_dtype=torch.float16, clip_grad=0.5, loss_scale=None,
          initial_loss_scale=4096.0, min_loss_scale=2.0, loss_scale_window=50, hysteresis=1)),
    (dict(loss_scale=512.0, grad_clip=None),
     dict(fp16=True, bf16=False, params_dtype=torch.float16, clip_grad=0.0, loss_scale=512.0,
          initial_loss_scale=32768.0, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2)),
    (dict(trainer="bf16"), dict(fp16=False, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0)),
    (dict(trainer="fp32", grad_clip=2.0), dict(fp16=False, bf16=False, params_dtype=torch.float32, clip_grad=2.0)),
])
def test_optimizer_kwargs_field_by_field(config, expected):
    from megatron.core.optimizer import OptimizerConfig

    c = PrecisionConfig(**config)
    assert c.optimizer_kwargs() == expected
    built = c.optimizer_config(lr=3e-6, weight_decay=0.0, use_distributed_optimizer=True)
    assert isinstance(built, OptimizerConfig)
    assert all(getattr(built, k) == v for k, v in expected.items())
    assert (built.lr, built.weight_decay, built.use_distributed_optimizer) == (3e-6, 0.0, True)
    if c.trainer is not Precision.FP16:  # no scaler settings: Megatron's own (unused) defaults
        assert built.loss_scale is None and built.initial_loss_scale == OptimizerConfig.initial_loss_scale


@pytest.mark.parametrize("config,extra,needles", [
    (dict(), {"learning_rate": 1e-3}, ["'learning_rate' is not an OptimizerConfig field"]),
    (dict(), {"clip_grad": 2.0}, ["clip_grad=2.0 is set by PrecisionConfig", "clip_grad -> 1.0"]),
    (dict(), {"loss_scale": 8.0}, ["loss_scale=8.0 is set by PrecisionConfig"]),
    (dict(), {"bf16": True}, ["bf16=True is set by PrecisionConfig"]),
    (dict(trainer="bf16"), {"fp8_recipe": "delayed"}, ["fp8_recipe='delayed' is for FP8 training",
                                                       "valid: None"]),
    (dict(), {"optimizer": "muon"}, ["optimizer='muon' with trainer='fp16'",
                                     "muon with fp16 is not supported.", "valid: 'adam' or 'sgd'"]),
    (dict(), {"use_precision_aware_optimizer": True, "use_distributed_optimizer": True,
              "main_params_dtype": torch.float16},
     ["main_params_dtype=torch.float16 and trainer='fp16'", "FP16 master weights",
      "valid: main_params_dtype=torch.float32"]),
    (dict(), {"use_precision_aware_optimizer": True, "use_distributed_optimizer": True,
              "main_grads_dtype": torch.bfloat16},
     ["main_grads_dtype=torch.bfloat16 and trainer='fp16'", "grad clipping",
      "valid: main_grads_dtype=torch.float32"]),
])
def test_optimizer_extra_errors(config, extra, needles):
    with pytest.raises(ValueError) as e:
        PrecisionConfig(**config).optimizer_config(**extra)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


# -- vLLM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,dtype,head", [
    (dict(), "float16", "float32"),
    (dict(fp32_logits=False), "float16", "model"),
    (dict(trainer="bf16"), "bfloat16", "float32"),
    (dict(trainer="bf16", rollout="fp32", allow_mismatched_precision=True), "float32", "float32"),
])
def test_vllm_kwargs_field_by_field(config, dtype, head):
    assert PrecisionConfig(**config).vllm_kwargs() == dict(
        dtype=dtype, kv_cache_dtype="auto", hf_overrides={"head_dtype": head})


def test_vllm_resolves_the_kwargs_to_the_same_precision(tmp_path):
    """vLLM's own EngineArgs turns the kwargs into the model and lm_head dtypes the trainer uses."""
    from vllm.engine.arg_utils import EngineArgs

    from megatron_rlfp16.testing.tiny import make_tiny_model

    model_dir = make_tiny_model("llama", str(tmp_path / "tiny"))
    cases = [(PrecisionConfig(), torch.float16, torch.float32),
             (PrecisionConfig(fp32_logits=False), torch.float16, torch.float16),
             (PrecisionConfig(trainer="bf16", rollout="fp32", allow_mismatched_precision=True),
              torch.float32, torch.float32)]
    for precision, dtype, head in cases:
        model_config = EngineArgs(model=model_dir, skip_tokenizer_init=True,
                                  **precision.vllm_kwargs()).create_model_config()
        assert (model_config.dtype, model_config.head_dtype) == (dtype, head)
        assert model_config.dtype == precision.rollout_precision.torch_dtype
