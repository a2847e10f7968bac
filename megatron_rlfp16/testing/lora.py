"""Random LoRA adapters in PEFT's names, made with ``peft`` itself (a dev dependency: tests only)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def random_adapter_tensors(hf_dir: str, targets: Sequence[str], *, rank: int, alpha: float, seed: int = 0,
                           std: float = 0.1) -> Dict[str, torch.Tensor]:
    """``{PEFT name: tensor}`` for a ``peft`` LoRA of ``rank`` on ``targets`` of the model in
    ``hf_dir``, every ``lora_A`` and ``lora_B`` random (``peft`` starts B at zero, which would leave
    every adapter path untested)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    return {name.replace(".default", ""): std * torch.randn(p.shape, generator=g)
            for name, p in peft_model.named_parameters() if "lora_" in name}
