"""Moving the trainer's state out of device memory around the rollout, and back, bit for bit.

A colocated run needs the device for vLLM's weights and KV cache while it samples, and for
Megatron's parameters, gradient buffers, FP32 master weights and Adam moments while it trains
(docs/gpu.md). :class:`TrainerOffload` copies every storage of that state to host memory (pinned
on GPU) and shrinks the device storage to zero bytes; ``reload`` grows each storage back and
copies the bytes in. It works on storages, not tensors, so every view into Megatron's contiguous
buffers (parameters and ``main_grad`` are views of them) comes back at the same address with the
same contents. On CPU the "device" is host memory too; the same code runs and frees the same
storages, which is how the tests check it.

The state comes in three kinds, moved together or apart (``offload(kinds)``): ``"params"`` (the
model's parameters), ``"grads"`` (DDP's ``main_grad`` buffers) and ``"optimizer"`` (what only the
optimizer holds: FP32 master weights and Adam moments; an optimizer tensor that shares a parameter's
storage, as FP32 training's, is a parameter). The trainer moves the gradients and the optimizer
out before the refit, which then needs only the weights, and with ``offload_optimizer`` keeps the
optimizer's part on the host except while it steps. The host copies are kept between offloads
(pinned memory is slow to allocate), so an offload after the first allocates nothing.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Tuple

import torch

KINDS = ("params", "grads", "optimizer")


def _kinded_tensors(model, optimizer) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(kind, tensor)`` for every tensor of the trainer's state; an optimizer tensor whose storage
    is a parameter's or a gradient's is listed under that kind only."""
    models = model if isinstance(model, (list, tuple)) else [model]
    owned = set()
    for m in models:
        for p in m.parameters():
            owned.add(p.untyped_storage().data_ptr())
            yield "params", p
            grad = getattr(p, "main_grad", None)
            if grad is not None:
                owned.add(grad.untyped_storage().data_ptr())
                yield "grads", grad
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                values = [p] + [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v)]
                for t in values:
                    if t.untyped_storage().data_ptr() not in owned:
                        yield "optimizer", t


def _state_tensors(model, optimizer) -> Iterator[torch.Tensor]:
    """Every tensor of the trainer's state: parameters and their ``main_grad`` (DDP's buffers), the
    optimizers' parameters (FP32 master copies, or the parameters themselves) and state (moments)."""
    for _, t in _kinded_tensors(model, optimizer):
        yield t


class TrainerOffload:
    """``offload()`` / ``reload()`` of a model (or list of model chunks) and its Megatron optimizer,
    all of its state or some kinds of it (:data:`KINDS`)."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer
        self._moved: Dict[str, List[Tuple[torch.UntypedStorage, torch.UntypedStorage]]] = {}
        """Per offloaded kind: ``(device storage, host copy)``."""
        self._host_copies: Dict[Tuple[int, int], torch.UntypedStorage] = {}
        """Host buffers kept for the next offload, by (device storage's address, bytes)."""

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)

    def _storages(self, kinds: Iterable[str]) -> List[Tuple[str, torch.UntypedStorage]]:
        kinds = set(kinds)
        seen, out = set(), []
        for kind, t in _kinded_tensors(self.model, self.optimizer):
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            if kind in kinds:
                out.append((kind, storage))
        return out

    def offload(self, kinds: Iterable[str] = KINDS) -> int:
        """Copies the state of ``kinds`` to host memory and frees its device storage; returns the
        bytes freed (a kind already offloaded is left as it is). Collective-free."""
        kinds = _checked(kinds)
        pinned = torch.cuda.is_available()
        freed = 0
        for kind, storage in self._storages(k for k in kinds if k not in self._moved):
            key = (storage.data_ptr(), storage.nbytes())
            host = self._host_copies.pop(key, None)
            if host is None:
                host = torch.UntypedStorage(storage.nbytes(), device="cpu")
                if pinned and storage.device.type == "cuda":
                    host = host.pin_memory()
            host.copy_(storage)
            self._moved.setdefault(kind, []).append((storage, host))
            freed += storage.nbytes()
            storage.resize_(0)
        for kind in kinds:  # a kind with nothing to move (no optimizer state yet) counts as moved
            self._moved.setdefault(kind, [])
        if pinned:
            torch.cuda.empty_cache()
        return freed

    def reload(self, kinds: Iterable[str] = KINDS) -> int:
        """Gives every storage of ``kinds`` its bytes back at its own size; returns the bytes restored."""
        restored = 0
        for kind in _checked(kinds):
            for storage, host in self._moved.pop(kind, []):
                storage.resize_(host.nbytes())
                storage.copy_(host)
                restored += host.nbytes()
                self._host_copies[(storage.data_ptr(), storage.nbytes())] = host
        return restored

    def host_bytes(self) -> int:
        """Bytes of the state held in host memory now (what is offloaded)."""
        return sum(host.nbytes() for moved in self._moved.values() for _, host in moved)

    def resident_bytes(self, kinds: Iterable[str] = KINDS) -> int:
        """Bytes the trainer's state of ``kinds`` holds in its storages now (0 while offloaded)."""
        return sum(s.nbytes() for _, s in self._storages(_checked(kinds)))


def _checked(kinds: Iterable[str]) -> Tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"TrainerOffload kind {kind!r}; valid: {list(KINDS)}")
    return kinds
