"""The embedded default run's ingredients: a synthetic task, its tokenizer, a tiny random model.

Shared by ``examples/grpo_cpu_demo.py`` and the trainer's tests, so that what the tests resume and
compare is exactly what ``make demo`` runs.
"""
from __future__ import annotations

import os

import torch.distributed as dist


def make_model_dir(path: str, vocab_size: int, seed: int) -> None:
    """A tiny random Llama-shaped HF checkpoint, written atomically (head size 32: the smallest
    vLLM-CPU attention supports)."""
    import torch
    import transformers

    from megatron_rlfp16.checkpoint import AtomicDir

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with AtomicDir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)


def embedded_setup(out_dir: str, *, seed: int = 0, task_name: str = "reverse", length: int = 3):
    """``(task, tokenizer, hf_dir)``; collective when torch.distributed is up (rank 0 writes the
    model, the others wait). The tokenizer is fitted on every rank (deterministic, ~0.1 s)."""
    from megatron_rlfp16.rewards import TaskConfig, TokenizerConfig, build_task, train_tokenizer

    task = build_task(TaskConfig(names=(task_name,), min_len=length, max_len=length))
    tokenizer = train_tokenizer(task, TokenizerConfig(vocab_size=64, seed=seed))
    hf_dir = os.path.join(out_dir, "hf_init")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.isdir(hf_dir):
        os.makedirs(out_dir, exist_ok=True)
        make_model_dir(hf_dir, tokenizer.vocab_size, seed)
    if dist.is_initialized():
        dist.barrier()
    return task, tokenizer, hf_dir
