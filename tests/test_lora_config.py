"""``LoraConfig`` and the PEFT directory format: every bad value named, the config PEFT reads."""
import json

import pytest
import torch

from megatron_rlfp16.lora import LORA_TARGETS, LoraConfig, adapter_config, read_peft_dir, write_peft_dir


def test_defaults_and_scale():
    c = LoraConfig(rank=8).validate()
    assert c.enabled and c.resolved_alpha == 16.0 and c.scale == 2.0
    assert not LoraConfig().enabled
    assert LoraConfig(rank=4, alpha=4).scale == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=-1), r"LoraConfig.rank=-1; valid: an integer >= 1 \(0: no LoRA\)"),
    (dict(rank=2.5), r"LoraConfig.rank=2.5; valid: an integer >= 1"),
    (dict(rank=4, alpha=0), r"LoraConfig.alpha=0; valid: a number > 0, or None \(2 x rank\)"),
    (dict(rank=4, alpha=-2.0), r"LoraConfig.alpha=-2.0; valid: a number > 0"),
    (dict(rank=4, dropout=1.0), r"LoraConfig.dropout=1.0; valid: a number in \[0, 1\)"),
    (dict(rank=4, target_modules=("q_proj", "qkv")),
     r"LoraConfig.target_modules=\['q_proj', 'qkv'\]: unknown \['qkv'\]; valid: q_proj, k_proj, v_proj, "
     r"o_proj, gate_proj, up_proj, down_proj"),
    (dict(rank=4, sync="full"), r"LoraConfig.sync='full'; valid: None, adapter, merged"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs).validate()


def test_default_targets_follow_the_model():
    assert LoraConfig(rank=4).targets_for(is_moe=False) == LORA_TARGETS
    assert LoraConfig(rank=4).targets_for(is_moe=True) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert LoraConfig(rank=4, target_modules=("o_proj",)).targets_for(is_moe=True) == ("o_proj",)
    LoraConfig(rank=4).validate(family="qwen3_moe", is_moe=True)  # the default is valid for MoE
    with pytest.raises(ValueError, match=r"LoraConfig.target_modules='q_proj'; valid: a tuple of"):
        LoraConfig(rank=4, target_modules="q_proj").validate()


def test_lora_on_moe_experts_is_refused_with_the_valid_targets():
    with pytest.raises(ValueError, match=r"gate_proj, down_proj are MoE experts in qwen3_moe, and LoRA on experts "
                                         r"is not supported; valid for qwen3_moe: q_proj, k_proj, v_proj, o_proj"):
        LoraConfig(rank=4, target_modules=("q_proj", "gate_proj", "down_proj")).validate(family="qwen3_moe",
                                                                                           is_moe=True)
    LoraConfig(rank=4, target_modules=("q_proj", "o_proj")).validate(family="qwen3_moe", is_moe=True)


def test_engine_lora_rank_is_checked():
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.rollout.engine import engine_lora_rank

    for bad in (0, 4, 9):
        with pytest.raises(ValueError, match=rf"RolloutConfig.max_lora_rank={bad}; valid: None or one of vLLM's "
                                             r"limits 1, 8, 16, 32, 64, 128, 256, 320, 512"):
            RolloutConfig(max_lora_rank=bad).validate()
    assert [engine_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="LoRA rank 600 is above the largest vLLM serves"):
        engine_lora_rank(600)


def test_engine_facts_match_the_installed_vllm():
    """The rank limits and the LoRA-capable families are vLLM's own."""
    import typing

    from vllm.config.lora import MaxLoRARanks
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    from megatron_rlfp16.bridge.families import model_types
    from megatron_rlfp16.rollout.engine import ENGINE_LORA_RANKS, LORA_FAMILIES

    assert tuple(typing.get_args(MaxLoRARanks)) == ENGINE_LORA_RANKS
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    assert set(architectures) == set(model_types().values())
    for family, arch in architectures.items():
        supports = supports_lora(ModelRegistry._try_load_model_cls(arch))
        assert supports == (family in LORA_FAMILIES), family


def test_peft_directory_round_trip_and_damage(tmp_path):
    config = LoraConfig(rank=2, alpha=4.0, target_modules=("v_proj", "q_proj"))
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2),
               "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.randn(2, 8),
               "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(4, 2)}
    out = write_peft_dir(tensors, config, str(tmp_path / "a"), base_model="base")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved == adapter_config(config, base_model="base")
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == ["q_proj", "v_proj"]
    read_config, read_tensors = read_peft_dir(out)
    assert (read_config.rank, read_config.resolved_alpha) == (2, 4.0)
    assert all(torch.equal(read_tensors[k], v) for k, v in tensors.items())
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        write_peft_dir(tensors, config, out)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is not a PEFT adapter directory: adapter_model.safetensors is missing"):
        read_peft_dir(out)
