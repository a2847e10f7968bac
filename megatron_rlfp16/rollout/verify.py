"""After a weight sync: does the engine compute what the trainer computes?

``verify_sync`` samples a small probe batch from the engine, re-scores the same tokens with the
Megatron model, and returns ``mismatch_metrics`` of the two. Right after a sync the difference is the
precision's rounding noise; stale weights, a stale prefix cache or a wrong mapping show up as
differences orders of magnitude larger.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


def probe_prompts(vocab_size: int, num: int = 4, length: int = 8, seed: int = 1234) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=g).tolist() for _ in range(num)]


def verify_sync(engine, model, arch, *, prompts: Optional[Sequence[Sequence[int]]] = None,
                max_tokens: int = 8, temperature: float = 1.0, seed: int = 0) -> Dict[str, float]:
    """Collective. Mismatch metrics (floats) between the engine's and the model's log-probs of a probe
    batch sampled by the engine; ``prompts`` default to random token ids."""
    from megatron_rlfp16.megatron.recompute import compute_logprobs
    from megatron_rlfp16.mismatch import mismatch_metrics

    prompts = prompts or probe_prompts(arch.vocab_size)
    batch = engine.generate(prompts, temperature=temperature, max_tokens=max_tokens, seed=seed)
    if not len(batch):
        raise ValueError("verify_sync: every probe prompt was skipped by the engine")
    from megatron_rlfp16.models.builder import model_sequence_multiple

    pad = model_sequence_multiple(model)
    tokens, mask, rollout = batch.to_tensors(pad_to_multiple=pad)
    was_training = model.training
    model.eval()
    try:
        train = compute_logprobs(model, [dict(input_ids=tokens)], vocab_size=arch.vocab_size,
                                 temperature=temperature)
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in mismatch_metrics(train, rollout, mask).items()}
