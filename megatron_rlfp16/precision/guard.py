"""Watches FP16 headroom per module, and runs chosen modules as FP32 islands.

Why: this project trains in FP16 because FP16's 10-bit mantissa keeps the trainer's log-probs close
to the rollout engine's (Qi et al. 2025, https://arxiv.org/abs/2510.26788). The price is range:
FP16 tops out at 65504 and goes subnormal below 2**-14 (~6.1e-5), where BF16 reaches ~3e38. Loss
scaling protects gradients in aggregate, but a single layer whose activations creep towards 65504
(an attention logit, an MLP down-projection, a residual stream late in training) overflows to inf
with no warning, and the step is wasted or the run diverges. :class:`OverflowGuard` sees it coming:
it names the modules whose running max |output| has used more than ``warn_fraction`` of FP16's
range, before any inf, and flags the ones that already produced inf/nan. :func:`promote_to_fp32`
is the usual fix for the few modules it names.

Cost model: per hooked output tensor, one ``aminmax`` reduction whose two 0-dim results are kept on
the device in a list; no host sync. ``step()`` folds the lists into one running-max vector with a
few vectorised ops (``stack`` + ``scatter_reduce``), still without a sync, and syncs once every
``check_every`` steps to compare against the thresholds. ``report()`` syncs once. The per-step
index tensor for the fold is cached by call pattern, so a steady training loop copies nothing from
the host after its first step. A container that returns its last child's output object unchanged
(a ``Sequential``, a layer ending in a norm) reuses the child's reduction instead of a second pass.

Modules inside an FP32 island are still measured against FP16's range: a value there above 65504
says the island is still needed, and one flagged at the island's edge says it is not enough.

Anti-goals: this is a diagnostic, not a loss scaler (Megatron's grad scaler still decides to skip
steps); statistics are per rank (all-reduce them yourself if you want a global view); hooks are not
meant to be captured into CUDA graphs or traced by ``torch.compile`` (detach first).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron_rlfp16.precision.islands import (  # noqa: F401  (promote_to_fp32: its old home)
    ModuleFilter,
    _floating_tensors,
    _select_modules,
    promote_to_fp32,
)

__all__ = [
    "FP16_MAX",
    "FP16_SMALLEST_NORMAL",
    "FP16HeadroomWarning",
    "ModuleStat",
    "OverflowGuard",
    "promote_to_fp32",
]

FP16_MAX = float(torch.finfo(torch.float16).max)
"""65504: the largest finite FP16 value; anything above rounds to inf."""
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).tiny)
"""2**-14 ~ 6.1e-5: below this FP16 is subnormal and loses mantissa bits, then flushes to 0."""

_MAX_PENDING = 4096  # fold early if step() is never called, so memory stays bounded
_MAX_CACHED_INDICES = 16


class FP16HeadroomWarning(RuntimeWarning):
    """A module's outputs came within ``1 / warn_fraction`` of FP16's max, or were inf/nan.

    Route it to logging with ``logging.captureWarnings(True)``; silence or escalate it with the
    ``warnings`` filters as with any category.
    """


@dataclasses.dataclass(frozen=True)
class ModuleStat:
    """What one module's outputs (``kind="activation"``) or their gradients (``"grad"``) did."""

    name: str
    """The module's name in ``model.named_modules()`` ("" is the model itself)."""
    kind: str
    """``"activation"`` for forward outputs, ``"grad"`` for gradients w.r.t. those outputs."""
    max_abs: float
    """Running max |x| since the last ``reset()``; inf once any inf or nan was seen."""
    nonfinite: bool
    """Whether an inf or nan was seen (nan is counted as overflow: in FP16 it usually is one)."""
    count: int
    """How many tensors were observed."""
    min_nonzero_abs: Optional[float] = None
    """Running min of the nonzero |x|; None unless the guard was built with ``track_min=True``."""

    @property
    def headroom(self) -> float:
        """FP16_MAX / max_abs: how many times larger values could get before overflowing.

        inf for all-zero outputs, 0.0 for outputs that already overflowed.
        """
        if self.max_abs == 0.0:
            return float("inf")
        return FP16_MAX / self.max_abs

    @property
    def below_normal(self) -> bool:
        """True when every observed value was below FP16's normal range (yet not all zero)."""
        return 0.0 < self.max_abs < FP16_SMALLEST_NORMAL


@dataclasses.dataclass
class _Pending:
    slots: List[int] = dataclasses.field(default_factory=list)
    mins: List[torch.Tensor] = dataclasses.field(default_factory=list)
    maxes: List[torch.Tensor] = dataclasses.field(default_factory=list)
    min_nonzero: List[torch.Tensor] = dataclasses.field(default_factory=list)


class OverflowGuard:
    """Opt-in forward (and gradient) hooks recording each module's max |output| against FP16.

    Usage::

        guard = OverflowGuard(model, warn_fraction=0.25, track_grads=True, check_every=10)
        with guard:                      # or guard.attach() ... guard.detach()
            for batch in data:
                loss = model(batch).sum(); loss.backward(); optimizer.step()
                guard.step()             # warns with FP16HeadroomWarning, every 10th step
        for stat in guard.report(top_k=5):
            print(stat.name, stat.kind, stat.max_abs, stat.headroom)

    Args:
        model: the module tree to watch.
        warn_fraction: warn when a module's running max |x| exceeds ``warn_fraction * 65504``, i.e.
            when less than ``1 / warn_fraction`` headroom is left. In (0, 1].
        track_grads: also record max |grad| of each hooked module's outputs, through a tensor hook
            registered on every output that requires grad. Under loss scaling these are the scaled
            gradients, which are the ones that overflow.
        modules: which modules to hook: None for every submodule except the root, a name or list
            of names (unknown names are an error), or a predicate ``(name, module) -> bool``
            applied to every entry of ``model.named_modules()``, the root ("") included.
        check_every: ``step()`` syncs with the device and checks thresholds every this many calls.
        track_min: also record the smallest nonzero |x| (costs an abs, a masked fill and a second
            reduction per tensor, so it is off by default).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warn_fraction: float = 0.25,
        track_grads: bool = False,
        modules: ModuleFilter = None,
        check_every: int = 1,
        track_min: bool = False,
    ) -> None:
        if not 0.0 < warn_fraction <= 1.0:
            raise ValueError(f"warn_fraction={warn_fraction!r}: must be in (0, 1], e.g. 0.25")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r}: must be an integer >= 1")
        self.model = model
        self.warn_fraction = float(warn_fraction)
        self.track_grads = bool(track_grads)
        self.check_every = check_every
        self.track_min = bool(track_min)
        self._targets = _select_modules(model, modules)
        kinds = ("activation", "grad") if self.track_grads else ("activation",)
        self._slots: List[Tuple[str, str]] = [(n, k) for n, _ in self._targets for k in kinds]
        self._handles: list = []
        self._steps = 0
        self._index_cache: Dict[Tuple[torch.device, Tuple[int, ...]], torch.Tensor] = {}
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def module_names(self) -> List[str]:
        """Names of the hooked modules, in ``named_modules()`` order."""
        return [name for name, _ in self._targets]

    def attach(self) -> "OverflowGuard":
        """Registers the forward hooks; returns self, so ``guard = OverflowGuard(m).attach()``."""
        if self._handles:
            raise RuntimeError("OverflowGuard is already attached; call detach() first")
        per_module = 2 if self.track_grads else 1
        for i, (_, module) in enumerate(self._targets):
            slot = i * per_module
            grad_slot = slot + 1 if self.track_grads else None
            hook = functools.partial(self._forward_hook, slot, grad_slot)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        """Removes every hook; gradient hooks left on live tensors become no-ops. Stats are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None

    def __enter__(self) -> "OverflowGuard":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Forgets every statistic and every warning already given."""
        self._pending: Dict[torch.device, _Pending] = {}
        self._running_max: Dict[torch.device, torch.Tensor] = {}
        self._running_min: Dict[torch.device, torch.Tensor] = {}
        self._counts = [0] * len(self._slots)
        self._warned: set = set()
        self._last = None  # (tensor, its _version, device, reductions) of the last observation

    # -- hooks (hot path: no host sync; allocates only the 0-dim reduction results) ---------

    def _forward_hook(self, slot: int, grad_slot: Optional[int], module, args, output) -> None:
        for t in _floating_tensors(output):
            self._observe(slot, t)
            if grad_slot is not None and t.requires_grad:
                t.register_hook(functools.partial(self._grad_hook, grad_slot))

    def _grad_hook(self, slot: int, grad: torch.Tensor) -> None:
        if self._handles:  # a tensor from before detach() must not keep recording
            self._observe(slot, grad)

    def _observe(self, slot: int, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        last = self._last
        if last is not None and last[0] is t and last[1] == t._version:
            # A container returning its last child's output (a Sequential, a layer ending in a
            # norm) or a second hook on one gradient: reuse the reduction. The version check
            # catches an in-place change in between.
            device, reduced = last[2], last[3]
        else:
            device, detached = t.device, t.detach()
            reduced = torch.aminmax(detached)  # one pass; max |x| = max(hi, -lo); nan propagates
            if self.track_min:
                a = detached.abs()
                reduced = (*reduced, a.masked_fill(a == 0, float("inf")).amin())
            self._last = (t, t._version, device, reduced)
        pending = self._pending.get(device)
        if pending is None:
            pending = self._pending[device] = _Pending()
        pending.slots.append(slot)
        pending.mins.append(reduced[0])
        pending.maxes.append(reduced[1])
        if self.track_min:
            pending.min_nonzero.append(reduced[2])
        self._counts[slot] += 1
        if len(pending.slots) >= _MAX_PENDING:
            self._fold(device, pending)
            del self._pending[device]

    # -- folding and checking -----------------------------------------------------------------

    def _index(self, device: torch.device, slots: List[int]) -> torch.Tensor:
        key = (device, tuple(slots))
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) >= _MAX_CACHED_INDICES:
                self._index_cache.clear()
            host = torch.tensor(slots, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()  # so the copy below does not block the host
            index = self._index_cache[key] = host.to(device, non_blocking=True)
        return index

    def _fold(self, device: torch.device, pending: _Pending) -> None:
        # Running stats must be normal tensors even if this runs under inference_mode (a rollout
        # log-prob pass), or the next in-place fold outside it would fail.
        with torch.no_grad(), torch.inference_mode(False):
            self._fold_into_running(device, pending)

    def _fold_into_running(self, device: torch.device, pending: _Pending) -> None:
        index = self._index(device, pending.slots)
        his = torch.stack(pending.maxes).float()
        los = torch.stack(pending.mins).float()
        absmax = torch.maximum(his, los.neg()).nan_to_num_(nan=float("inf"), posinf=float("inf"))
        running = self._running_max.get(device)
        if running is None:
            running = torch.zeros(len(self._slots), dtype=torch.float32, device=device)
            self._running_max[device] = running
        running.scatter_reduce_(0, index, absmax, "amax")
        if pending.min_nonzero:
            mins = torch.stack(pending.min_nonzero).float()
            running_min = self._running_min.get(device)
            if running_min is None:
                running_min = torch.full((len(self._slots),), float("inf"), device=device)
                self._running_min[device] = running_min
            running_min.scatter_reduce_(0, index, mins, "amin")

    def _flush(self) -> None:
        for device, pending in self._pending.items():
            self._fold(device, pending)
        self._pending = {}
        self._last = None  # don't keep the last tensor (and its graph) alive past a step

    def _collect(self) -> List[ModuleStat]:
        """Every observed slot's statistic; one host sync per device holding statistics."""
        self._flush()
        max_abs = [0.0] * len(self._slots)
        min_abs: List[Optional[float]] = [None] * len(self._slots)
        for running in self._running_max.values():
            max_abs = [max(a, b) for a, b in zip(max_abs, running.tolist())]
        for running in self._running_min.values():
            min_abs = [b if a is None else min(a, b) for a, b in zip(min_abs, running.tolist())]
        stats = []
        for slot, (name, kind) in enumerate(self._slots):
            if self._counts[slot] == 0:
                continue
            low = min_abs[slot]
            stats.append(ModuleStat(
                name=name,
                kind=kind,
                max_abs=max_abs[slot],
                nonfinite=max_abs[slot] == float("inf"),
                count=self._counts[slot],
                min_nonzero_abs=None if low is None or low == float("inf") else low,
            ))
        return stats

    def step(self) -> List[ModuleStat]:
        """Call once per training step (after backward). Folds this step's observations on the
        device; every ``check_every``-th call also syncs, emits one :class:`FP16HeadroomWarning`
        naming every module that newly crossed the threshold or produced inf/nan, and returns
        those modules' stats (empty on the other calls). Each (module, kind, reason) warns once
        until ``reset()``.
        """
        self._steps += 1
        if self._steps % self.check_every:
            self._flush()
            return []
        limit = self.warn_fraction * FP16_MAX
        flagged, lines = [], []
        for stat in self._collect():
            reason = "nonfinite" if stat.nonfinite else "headroom" if stat.max_abs > limit else None
            if reason is None or (stat.name, stat.kind, reason) in self._warned:
                continue
            self._warned.add((stat.name, stat.kind, reason))
            flagged.append(stat)
            if reason == "nonfinite":
                lines.append(f"  {stat.name or '<root>'} ({stat.kind}): produced inf/nan")
            else:
                lines.append(
                    f"  {stat.name or '<root>'} ({stat.kind}): max |x| = {stat.max_abs:.6g}, "
                    f"headroom {stat.headroom:.3g}x < {1 / self.warn_fraction:.3g}x"
                )
        if flagged:
            warnings.warn(
                f"FP16 overflow guard, step {self._steps}: {len(flagged)} module output(s) near or "
                f"past FP16's max {FP16_MAX:g}:\n" + "\n".join(lines)
                + "\nConsider promote_to_fp32(model, [...]) for these modules.",
                FP16HeadroomWarning,
                stacklevel=2,
            )
        return flagged

    def report(self, top_k: Optional[int] = 10) -> List[ModuleStat]:
        """The ``top_k`` observed (module, kind) stats with the least headroom first (all if None).

        Overflowed ones (headroom 0) come first; ties are broken by name. Syncs once.
        """
        stats = sorted(self._collect(), key=lambda s: (s.headroom, s.name, s.kind))
        return stats if top_k is None else stats[:top_k]


# -- FP32 islands --------------------------------------------------------------------------------
