"""Adapters as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``): what ``peft``
(``PeftModel.from_pretrained``) and vLLM (``LoRARequest(name, id, path)``) load directly."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from megatron_rlfp16.lora.config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config(config: LoraConfig, *, base_model: Optional[str] = None, is_moe: bool = False) -> dict:
    """PEFT's ``LoraConfig`` fields for these adapters (the ones PEFT and vLLM read; PEFT fills the
    rest with its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.resolved_alpha, "lora_dropout": float(config.dropout),
        "target_modules": sorted(config.targets_for(is_moe)), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }


def gather_adapters(model, arch, *, copy: bool = True) -> Dict[str, torch.Tensor]:
    """Collective over the world: every rank gets all adapters of the model, PEFT-named, on CPU
    (tensor-parallel shards gathered, pipeline stages joined). ``copy=False``: a world of one on CPU
    may get views of the adapters (``lora_state_dict(copy=False)``), for a caller that copies them."""
    import torch.distributed as dist

    from megatron_rlfp16.lora.layers import lora_state_dict

    mine = {k: v.cpu() for k, v in lora_state_dict(model, arch, copy=copy).items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: Dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def sync_adapters(model, arch, engine, config: LoraConfig, dtype: torch.dtype) -> Dict[str, int]:
    """The adapter-only weight sync (collective over the world): the adapters gathered whole, in
    ``dtype``, handed to ``engine`` (a ``RolloutEngine``) in memory as its new adapter version.
    Returns the number of tensors and their bytes (what moved)."""
    from megatron_rlfp16.compat.megatron import cpu_stand_ins_paused

    with cpu_stand_ins_paused():  # tensor reshuffles and copies: nothing here places anything on CUDA
        tensors = gather_adapters(model, arch, copy=False)
        engine.set_adapter_tensors(tensors, config, dtype=dtype)  # the one copy, in dtype
    return dict(tensors=len(tensors), bytes=sum(t.numel() * dtype.itemsize for t in tensors.values()))


def adapted_config(tensors: Dict[str, torch.Tensor], config: LoraConfig) -> LoraConfig:
    """``config`` with ``target_modules`` set to the modules ``tensors`` (PEFT-named) adapt."""
    import dataclasses

    found = sorted({name.rsplit(".", 3)[-3] for name in tensors})
    return dataclasses.replace(config, target_modules=tuple(found)) if found else config


def write_peft_dir(tensors: Dict[str, torch.Tensor], config: LoraConfig, out_dir: str, *,
                   base_model: Optional[str] = None, overwrite: bool = False, dtype=None) -> str:
    """Writes ``tensors`` (PEFT-named) and their config to ``out_dir`` atomically; returns it. The
    config's ``target_modules`` are the modules the tensors adapt."""
    from safetensors.torch import save_file

    from megatron_rlfp16.checkpoint.hf_io import AtomicDir

    config = adapted_config(tensors, config)
    with AtomicDir(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(adapter_config(config, base_model=base_model), f, indent=2)
        save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in sorted(tensors.items())},
                  os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def read_peft_dir(path: str) -> tuple:
    """``(LoraConfig, tensors)`` of a PEFT LoRA directory, with errors that name the file."""
    from safetensors.torch import load_file

    from megatron_rlfp16.checkpoint.hf_io import read_json

    cfg_path, weights = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path!r} is not a PEFT adapter directory: {os.path.basename(p)} is missing")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are read")
    targets = cfg.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    config = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                        dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=tuple(targets))
    return config.validate(), load_file(weights)
