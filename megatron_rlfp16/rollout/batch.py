"""What a rollout returns, and its layout as training tensors.

Sequences are ``prompt + response``. Training scores ``targets = tokens[:, 1:]`` from the logits at
``tokens[:, :-1]``, so every per-token tensor here is ``[B, S-1]`` and aligned with the targets:
``mask`` is 1 on response tokens, ``rollout_logprobs`` holds the engine's log-probs there.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np
import torch

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE


@dataclasses.dataclass
class RolloutBatch:
    prompts: List[List[int]]
    """One entry per sample (a prompt sampled n times appears n times)."""
    responses: List[List[int]]
    logprobs: List[List[float]]
    """The engine's log-probs of each response token, of the distribution it sampled from."""
    prompt_index: List[int]
    """Index of each sample's prompt in the request (groups of n for GRPO)."""
    finished: List[bool]
    """True where the response ended by a stop token, False where it hit max_tokens."""
    skipped: List[int] = dataclasses.field(default_factory=list)
    """Indices of requested prompts that were not generated (empty, or too long for the engine)."""
    routes: Optional[List[np.ndarray]] = None
    """With ``RolloutConfig.return_routes``: per sample, the experts the engine routed each token to,
    ``[len(prompt) + len(response) - 1, layers, top-k]`` int16 (``megatron_rlfp16.routing``)."""

    def __len__(self) -> int:
        return len(self.responses)

    @classmethod
    def concat(cls, parts: List["RolloutBatch"]) -> "RolloutBatch":
        """Joins batches whose ``prompt_index`` and ``skipped`` already refer to one request."""
        with_routes = bool(parts) and all(p.routes is not None for p in parts)
        out = cls(prompts=[], responses=[], logprobs=[], prompt_index=[], finished=[], skipped=[],
                  routes=[] if with_routes else None)
        for part in parts:
            for field in ("prompts", "responses", "logprobs", "prompt_index", "finished", "skipped"):
                getattr(out, field).extend(getattr(part, field))
            if with_routes:
                out.routes.extend(part.routes)
        return out

    def take(self, rows: Sequence[int], prompt_index: Sequence[int]) -> "RolloutBatch":
        """The samples ``rows``, in that order, renumbered to ``prompt_index`` (one per row); nothing
        skipped."""
        return type(self)(
            prompts=[self.prompts[i] for i in rows], responses=[self.responses[i] for i in rows],
            logprobs=[self.logprobs[i] for i in rows], prompt_index=list(prompt_index),
            finished=[self.finished[i] for i in rows], skipped=[],
            routes=None if self.routes is None else [self.routes[i] for i in rows])

    def to_tensors(self, pad_id: int = 0, pad_to_multiple: int = 1):
        """``tokens [B, S]``, ``mask [B, S-1]`` (float 0/1), ``rollout_logprobs [B, S-1]``, padded on
        the right; ``S`` rounded up to ``pad_to_multiple`` (sequence parallelism needs S % tp == 0)."""
        lengths = [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]
        s = max(lengths) if lengths else 1
        s = -(-s // pad_to_multiple) * pad_to_multiple
        b = len(self)
        tokens = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros(b, s - 1)
        logprobs = torch.zeros(b, s - 1)
        for i, (p, r, lp) in enumerate(zip(self.prompts, self.responses, self.logprobs)):
            tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            lo, hi = len(p) - 1, len(p) - 1 + len(r)
            mask[i, lo:hi] = 1.0
            logprobs[i, lo:hi] = torch.tensor(lp, dtype=ACCUM_DTYPE)
        return tokens, mask, logprobs

    def routes_tensor(self, seq_len: int) -> torch.Tensor:
        """The routes as one ``[B, seq_len, layers, top-k]`` int16 tensor, laid out like
        ``to_tensors``' tokens (``NO_ROUTE`` where the engine ran nothing: each last token, padding)."""
        from megatron_rlfp16.routing import NO_ROUTE, ROUTE_DTYPE

        if self.routes is None:
            raise ValueError("this batch has no routes: the engine was started without return_routes")
        if not self.routes:
            raise ValueError("this batch is empty")
        layers, topk = self.routes[0].shape[1:]
        out = torch.full((len(self), seq_len, layers, topk), NO_ROUTE, dtype=ROUTE_DTYPE)
        for i, r in enumerate(self.routes):
            out[i, : len(r)] = torch.from_numpy(np.ascontiguousarray(r)).to(ROUTE_DTYPE)
        return out


def apply_stop_strings(batch: "RolloutBatch", stops, decode) -> int:
    """Cuts each response after the first token at which its decoded text contains one of the stop
    strings ``stops``, and marks it finished; returns how many were cut.

    The engine runs without a tokenizer (it is given and returns token ids), so stop *strings* are
    applied here, after generation: the token at which a stop string completes is kept, the rest
    (and its log-probs) dropped, exactly as if the engine had stopped there. ``decode`` maps ids to
    text; a binary search over prefix lengths decodes O(log n) prefixes per response."""
    cut = 0
    for i, response in enumerate(batch.responses):
        if not response or not any(s in decode(response) for s in stops):
            continue
        lo, hi = 1, len(response)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in decode(response[:mid]) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        if lo < len(response) or not batch.finished[i]:
            batch.responses[i] = response[:lo]
            batch.logprobs[i] = batch.logprobs[i][:lo]
            if batch.routes is not None:  # the engine ran every kept token but the new last one
                batch.routes[i] = batch.routes[i][: len(batch.prompts[i]) + lo - 1]
            batch.finished[i] = True
            cut += 1
    return cut
