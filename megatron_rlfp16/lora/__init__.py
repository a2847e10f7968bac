"""LoRA for RL on Megatron-Core: adapters on the trainer's tensor-parallel linears, PEFT tensors in and out."""
from megatron_rlfp16.lora.config import LORA_TARGETS, LoraConfig
from megatron_rlfp16.lora.layers import (
    apply_lora, load_lora_state_dict, lora_state_dict, peft_names, trainable_parameters,
)
from megatron_rlfp16.lora.peft_dir import adapter_config, gather_adapters, read_peft_dir, sync_adapters, write_peft_dir

__all__ = ["LORA_TARGETS", "LoraConfig", "adapter_config", "apply_lora", "gather_adapters", "load_lora_state_dict",
           "lora_state_dict", "peft_names", "read_peft_dir", "sync_adapters", "trainable_parameters", "write_peft_dir"]
