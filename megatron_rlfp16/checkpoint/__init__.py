"""Checkpoints on disk: HF safetensors directories and Megatron distributed checkpoints."""
from megatron_rlfp16.checkpoint.hf_io import AtomicDir, CheckpointError, SafetensorsReader
from megatron_rlfp16.checkpoint.megatron_ckpt import (
    load_megatron_checkpoint, read_meta, recover_checkpoint, save_megatron_checkpoint,
)

__all__ = ["AtomicDir", "CheckpointError", "SafetensorsReader", "load_megatron_checkpoint",
           "read_meta", "recover_checkpoint", "save_megatron_checkpoint"]
