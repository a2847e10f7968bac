"""A short supervised warm start, so that RL on a tiny random model has a signal to amplify.

Supervised next-token training is the ``pg`` objective with advantage 1 and a token-mean: the loss
is then exactly the mean negative log-likelihood of the answer tokens. Running it through the RL
loss keeps one code path (and one precision/optimizer step) for both phases.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_rlfp16.losses import PolicyLossConfig

SFT_LOSS = PolicyLossConfig(loss="pg", agg="token-mean")


def supervised_batches(source, examples, micro_batch_size: int, pad_to_multiple: int = 1) -> List[dict]:
    """Micro-batches of ``prompt + answer + eos`` with the loss on the answer and eos, padded to a
    multiple of ``pad_to_multiple`` (the run plan's ``seq_multiple``)."""
    from megatron_rlfp16.megatron.batch import split

    seqs, starts = [], []
    for e in examples:
        p = source.encode_prompt(e)
        a = source.tokenizer.encode_answer(e.answer)
        seqs.append(p + a)
        starts.append(len(p))
    s = max(len(x) for x in seqs)
    s = -(-s // pad_to_multiple) * pad_to_multiple
    tokens = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s - 1)  # aligned with the targets tokens[:, 1:]
    for i, (x, start) in enumerate(zip(seqs, starts)):
        tokens[i, : len(x)] = torch.tensor(x)
        mask[i, start - 1: len(x) - 1] = 1.0
    n = len(seqs)
    return split(dict(input_ids=tokens, loss_mask=mask, advantages=torch.ones(n),
                      rollout_logprobs=torch.zeros(n, s - 1)), micro_batch_size)


def _supervised_steps(model, optimizer, stepper, source, *, arch, seq_multiple: int, steps: int, batch_size: int,
                      lr: float, seed: int, until_loss: Optional[float] = None) -> List[Dict[str, float]]:
    from megatron_rlfp16.megatron.train import train_step

    history = []
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = lr
    try:
        for step in range(steps):
            examples = source.task.dataset(batch_size, seed=10_000_019 * (seed + 1) + step)
            micro = supervised_batches(source, examples, batch_size, seq_multiple)
            out = train_step(model, micro, SFT_LOSS, vocab_size=arch.vocab_size)
            out.update(stepper.step())
            history.append({k: float(v) for k, v in out.items()})
            if until_loss is not None and history[-1]["loss"] <= until_loss:
                break  # the global batch's loss: the same on every rank, so every rank stops here
    finally:
        for g, value in zip(optimizer.param_groups, saved):
            g["lr"] = value
    return history


def warm_start(trainer, *, steps: int, batch_size: int, lr: float, seed: int = 0,
               until_loss: Optional[float] = None) -> List[Dict[str, float]]:
    """Up to ``steps`` supervised optimizer steps on fresh task examples (the trainer's trainable
    parameters: the adapters of a LoRA run), fewer when a step's loss (mean negative log-likelihood
    of the answer tokens) reaches ``until_loss``; returns per-step metrics."""
    if until_loss is not None and not until_loss > 0:
        raise ValueError(f"warm_start until_loss={until_loss!r}; valid: None or a loss > 0")
    history = _supervised_steps(trainer.model, trainer.optimizer, trainer.stepper, trainer.source,
                                arch=trainer.arch, seq_multiple=trainer.plan.seq_multiple, steps=steps,
                                batch_size=batch_size, lr=lr, seed=seed, until_loss=until_loss)
    trainer.sync_weights()
    return history


def warm_start_base(config, source, out_hf_dir: str, *, steps: int, batch_size: int, lr: float,
                    seed: int = 0) -> List[Dict[str, float]]:
    """Collective: fine-tunes the whole model of ``config.hf_dir`` (no LoRA, no engine) for ``steps``
    supervised steps and writes it to ``out_hf_dir`` as an HF checkpoint, the base a LoRA run then
    adapts (what a pretrained or SFT model is to a real LoRA RL run). Returns per-step metrics."""
    import dataclasses

    from megatron_rlfp16.checkpoint.convert import write_hf_model
    from megatron_rlfp16.lora import LoraConfig
    from megatron_rlfp16.plan import build_run, resolve_plan

    plan = resolve_plan(dataclasses.replace(config, lora=LoraConfig()))
    run = build_run(plan, seed=seed, engine=False)
    history = _supervised_steps(run.model, run.optimizer, run.stepper, source, arch=plan.arch,
                                seq_multiple=plan.seq_multiple, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    write_hf_model(run.model, plan.arch, out_hf_dir, hf_config=dict(plan.hf_config), dtype=plan.trainer_dtype,
                   overwrite=True, side_files_from=config.hf_dir)
    return history
