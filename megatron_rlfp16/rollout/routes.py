"""The experts the rollout engine routed each token to, captured while it samples.

vLLM 0.32 returns routed experts only through its V2 model runner, which needs Triton and so does not
run on CPU (``enable_return_routed_experts`` is refused there). The routers of the V1 runner accept a
capture callback all the same (``BaseRouter.set_capture_fn``, the hook vLLM's own capturer binds), so
:class:`RouteCapture` binds its own, on the engine that lives in this process:

- every MoE layer writes its top-k ids into one persistent buffer ``[tokens, layers, top-k]`` (a
  device copy; the engine runs eagerly while capturing, since vLLM captures its CUDA graphs before
  this binds, see ``RolloutConfig.enforce_eager``);
- after the runner prepares each step's inputs, the rows of the previous step are copied out with
  which request and which positions they belong to (request order, scheduled counts and the number
  of tokens each request had computed before the step);
- at the end of ``generate`` each sequence's routes are assembled by position. Positions served from
  the prefix cache were computed by another request with the same leading tokens (a sibling of the
  same prompt, or a prompt sharing a chat template): they are looked up by block, keyed by a chained
  hash of the block's tokens as vLLM's prefix cache is. The cache is reset at the start of each
  ``generate`` so that every cached block was computed, and captured, within it.

The engine internals this needs are in :mod:`megatron_rlfp16.compat.vllm` (``moe_layout``,
``note_each_step``). The layout of the result is :mod:`megatron_rlfp16.routing`'s (``[positions, layers, top-k]`` per
sequence, :data:`~megatron_rlfp16.routing.NO_ROUTE` where nothing ran).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_rlfp16.routing import NO_ROUTE


class RouteCapture:
    """Binds to the in-process engine ``llm`` (``compat.vllm.configure_in_process``)."""

    def __init__(self, llm):
        from megatron_rlfp16.compat.vllm import moe_layout, note_each_step

        self.llm = llm
        layout = moe_layout(llm)
        routers = layout["routers"]
        if not routers:
            raise ValueError("routes were asked for, but the engine's model has no MoE layers "
                             "(routing replay needs a mixture-of-experts model)")
        for _, router in routers:
            if not hasattr(router, "set_capture_fn"):
                raise ValueError(f"vLLM's router {type(router).__name__} takes no capture callback: "
                                 "routes cannot be captured with this vLLM version")
        self.topk = int(layout["topk"])
        self.num_layers = int(layout["num_layers"])
        self.layer_ids = sorted(layer for layer, _ in routers)
        if self.layer_ids[-1] >= self.num_layers:
            raise ValueError(f"the engine's MoE layer {self.layer_ids[-1]} is beyond the model's "
                             f"{self.num_layers} layers")
        self.block_size = layout["block_size"]
        self.prefix_caching = layout["prefix_caching"]
        self.buffer = torch.full((layout["max_tokens"], self.num_layers, self.topk), NO_ROUTE,
                                 dtype=torch.int16, device=layout["device"])
        for layer, router in routers:
            router.set_capture_fn(functools.partial(self._write, layer))
        self._pending: Optional[Tuple[List[str], np.ndarray, np.ndarray]] = None
        self.from_cache = 0
        self.steps: List[Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]] = []
        self.active = False
        note_each_step(llm, self._flush, self._note)

    def _note(self, req_ids, starts, counts) -> None:
        self._pending = (req_ids, starts, counts)

    def _write(self, layer: int, topk_ids: torch.Tensor) -> None:
        if self.active:
            self.buffer[: topk_ids.shape[0], layer] = topk_ids

    def _flush(self) -> None:
        if self._pending is None:
            return
        req_ids, starts, counts = self._pending
        self._pending = None
        if self.active:
            rows = int(counts.sum())
            self.steps.append((req_ids, starts, counts, np.array(self.buffer[:rows].cpu())))  # a copy, also on CPU

    # ---- one generate call ------------------------------------------------------------------
    def begin(self) -> None:
        """Before ``LLM.generate``: an empty record and an empty prefix cache."""
        if self.prefix_caching:
            self.llm.reset_prefix_cache()
        self.steps, self._pending, self.active = [], None, True
        self.buffer.fill_(NO_ROUTE)

    def end(self, sequences: Dict[Hashable, Sequence[int]],
            key_of: Callable[[str], Hashable] = lambda rid: rid) -> Dict[Hashable, np.ndarray]:
        """After ``LLM.generate``: ``{key: routes [len(tokens) - 1, layers, top-k]}`` for every
        sample in ``sequences`` (key -> its prompt + response token ids; ``key_of`` maps the engine's
        internal request id to that key). Positions are those the engine ran: all but the last token."""
        self._flush()
        self.active = False
        pieces: Dict[Hashable, List[Tuple[int, np.ndarray]]] = {}
        order: List[Hashable] = []
        for req_ids, starts, counts, rows in self.steps:
            at = 0
            for rid, start, count in zip(req_ids, starts.tolist(), counts.tolist()):
                rid = key_of(rid)
                if rid not in pieces:
                    pieces[rid] = []
                    order.append(rid)
                pieces[rid].append((int(start), rows[at:at + count]))
                at += count
        self.steps = []
        self.from_cache = 0  # positions taken from the block that served them from the prefix cache
        known: Dict[int, np.ndarray] = {}  # chained block hash -> that block's routes
        result: Dict[str, np.ndarray] = {}
        ran = [r for r in order if r in sequences] + [r for r in sequences if r not in pieces]
        for rid in ran:
            tokens = list(sequences[rid])
            n = max(len(tokens) - 1, 0)
            routes = np.full((n, self.num_layers, self.topk), NO_ROUTE, dtype=np.int16)
            filled = np.zeros(n, dtype=bool)
            for start, chunk in pieces.get(rid, []):  # in step order: a recomputation wins
                stop = min(start + len(chunk), n)
                if stop > start:
                    routes[start:stop] = chunk[: stop - start]
                    filled[start:stop] = True
            hashes = _block_hashes(tokens, self.block_size)
            for b, h in enumerate(hashes):
                lo, hi = b * self.block_size, (b + 1) * self.block_size
                if hi > n:
                    break
                if not filled[lo:hi].all() and h in known:
                    self.from_cache += int((~filled[lo:hi]).sum())
                    routes[lo:hi] = known[h]
                    filled[lo:hi] = True
                if filled[lo:hi].all():
                    known.setdefault(h, routes[lo:hi])
            if not filled.all():
                missing = np.flatnonzero(~filled)
                raise RuntimeError(
                    f"sample {rid}: no routes for {len(missing)} of {n} positions (first {missing[:5].tolist()}); "
                    "the engine ran them outside the capture (a prefix-cache hit on a block computed "
                    "before this generate call?)")
            result[rid] = routes
        return result


def _block_hashes(tokens: Sequence[int], block_size: int) -> List[int]:
    """One hash per full block of ``tokens``, each chained to the previous one (a block's hash
    names the whole prefix up to its end, as a prefix-cache key must)."""
    out, h = [], 0
    for lo in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[lo:lo + block_size])))
        out.append(h)
    return out
