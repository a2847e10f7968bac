"""LoRA for RL on Megatron-Core: adapters on the trainer's tensor-parallel linears, PEFT tensors in and out."""
from megatron_rlfp16.lora.config import LORA_TARGETS, LoraConfig
from megatron_rlfp16.lora.layers import (
    apply_lora, load_lora_state_dict, lora_state_dict, peft_names, trainable_parameters,
)

__all__ = ["LORA_TARGETS", "LoraConfig", "apply_lora", "load_lora_state_dict", "lora_state_dict", "peft_names",
           "trainable_parameters"]
