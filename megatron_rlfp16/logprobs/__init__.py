"""Log-probs stage: per-token log-probs and entropy from (vocabulary-parallel) logits, in FP32.

Pure torch and ``torch.distributed``; process groups are passed in, nothing reads Megatron's global
state (``megatron_rlfp16.megatron`` does that at its outermost API).

- ``vocab_parallel.py``  ``vocab_parallel_logprobs``: chunked, in-place-free, custom backward
- ``next_token.py``      ``next_token_logprobs``: the same for ``input_ids[:, 1:]`` ([B, S-1])
"""
from megatron_rlfp16.logprobs.next_token import next_token_logprobs
from megatron_rlfp16.logprobs.vocab_parallel import DEFAULT_CHUNK_BYTES, vocab_parallel_logprobs

__all__ = ["DEFAULT_CHUNK_BYTES", "next_token_logprobs", "vocab_parallel_logprobs"]
