"""Moving the trainer's state out of device memory around the rollout, and back, bit for bit.

A colocated run needs the device for vLLM's weights and KV cache while it samples, and for
Megatron's parameters, gradient buffers, FP32 master weights and Adam moments while it trains
(docs/gpu.md). :class:`TrainerOffload` copies every storage of that state to host memory (pinned
on GPU) and shrinks the device storage to zero bytes; ``reload`` grows each storage back and
copies the bytes in. It works on storages, not tensors, so every view into Megatron's contiguous
buffers (parameters and ``main_grad`` are views of them) comes back at the same address with the
same contents. On CPU the "device" is host memory too; the same code runs and frees the same
storages, which is how the tests check it.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch


def _state_tensors(model, optimizer) -> Iterator[torch.Tensor]:
    """Every tensor of the trainer's state: parameters and their ``main_grad`` (DDP's buffers), the
    optimizers' parameters (FP32 master copies, or the parameters themselves) and state (moments)."""
    models = model if isinstance(model, (list, tuple)) else [model]
    for m in models:
        for p in m.parameters():
            yield p
            grad = getattr(p, "main_grad", None)
            if grad is not None:
                yield grad
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                yield p
                for value in inner.state.get(p, {}).values():
                    if torch.is_tensor(value):
                        yield value


class TrainerOffload:
    """``offload()`` / ``reload()`` of a model (or list of model chunks) and its Megatron optimizer."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer
        self._host: Dict[int, torch.UntypedStorage] = {}
        self._storages: List[torch.UntypedStorage] = []
        self.offloaded = False

    def _unique_storages(self) -> List[torch.UntypedStorage]:
        seen, out = set(), []
        for t in _state_tensors(self.model, self.optimizer):
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            out.append(storage)
        return out

    def offload(self) -> int:
        """Copies the state to host memory and frees its device storage; returns the bytes freed.
        Collective-free; call it on every rank after the optimizer step (and the refit)."""
        if self.offloaded:
            raise RuntimeError("TrainerOffload.offload: the state is already offloaded (call reload first)")
        pinned = torch.cuda.is_available()
        self._storages = self._unique_storages()
        freed = 0
        for storage in self._storages:
            host = torch.UntypedStorage(storage.nbytes(), device="cpu")
            if pinned and storage.device.type == "cuda":
                host = host.pin_memory()
            host.copy_(storage)
            self._host[id(storage)] = host
            freed += storage.nbytes()
            storage.resize_(0)
        self.offloaded = True
        if pinned:
            torch.cuda.empty_cache()
        return freed

    def reload(self) -> int:
        """Gives every storage its bytes back at its own size; returns the bytes restored."""
        if not self.offloaded:
            return 0
        restored = 0
        for storage in self._storages:
            host = self._host.pop(id(storage))
            storage.resize_(host.nbytes())
            storage.copy_(host)
            restored += host.nbytes()
        self._storages, self.offloaded = [], False
        return restored

    def resident_bytes(self) -> int:
        """Bytes the trainer's state holds in its storages now (0 while offloaded)."""
        return sum(s.nbytes() for s in (self._storages if self.offloaded else self._unique_storages()))
