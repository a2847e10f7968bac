"""One loss scale per optimizer step, however many sub-optimizers Megatron builds.

``get_megatron_optimizer`` (megatron-core 0.16.1) returns a ``ChainedOptimizer`` with one
sub-optimizer per parameter kind (dense, and expert parameters under expert parallelism), each with
its own ``DynamicGradScaler``. The schedule scales the loss with the *first* one
(``ChainedOptimizer.get_loss_scale``), but each sub-optimizer unscales its gradients with, and
updates, its own (``MixedPrecisionOptimizer.prepare_grads``). An overflow only in expert gradients
then backs off only the expert scaler, and from the next step on expert gradients are unscaled by
the wrong factor (2^k off) and gradient clipping mixes the two scales.

:func:`install_grad_scaler` gives every sub-optimizer a :class:`SharedGradScaler` view of one
scaler: all unscale with the same factor, and the scaler is updated once per step, after the last
sub-optimizer reported, with the OR of their overflow flags (the same flag ``ChainedOptimizer.step``
uses to skip the step).
"""
from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["SharedGradScaler", "install_grad_scaler", "sub_optimizers", "unique_scalers"]


def sub_optimizers(optimizer) -> list:
    """The sub-optimizers of a ``ChainedOptimizer``, or ``[optimizer]``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class _Shared:
    def __init__(self, scaler, members: int):
        self.scaler = scaler
        self.members = members
        self.pending: Dict[int, bool] = {}

    def report(self, member: int, found_inf: bool) -> None:
        if member in self.pending:  # a new step began before every member reported: flush
            self._flush()
        self.pending[member] = bool(found_inf)
        if len(self.pending) == self.members:
            self._flush()

    def _flush(self) -> None:
        found_inf = any(self.pending.values())
        self.pending.clear()
        self.scaler.update(found_inf)


class SharedGradScaler:
    """One sub-optimizer's view of a scaler shared by the whole step.

    ``scale`` / ``inv_scale`` read the shared scaler; ``update`` records this member's overflow flag
    and the shared scaler updates once all members of the step have reported. Checkpoints save and
    load the shared scaler's state (each member saves the same values)."""

    def __init__(self, shared: _Shared, member: int):
        self._shared = shared
        self._member = member

    @property
    def inner(self):
        """The shared ``DynamicGradScaler`` / ``ConstantGradScaler``."""
        return self._shared.scaler

    @property
    def scale(self):
        return self._shared.scaler.scale

    @property
    def inv_scale(self):
        return self._shared.scaler.inv_scale

    def update(self, found_inf: bool) -> None:
        self._shared.report(self._member, found_inf)

    def state_dict(self):
        return self._shared.scaler.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self._shared.scaler.load_state_dict(state_dict)

    def __getattr__(self, name):  # min_scale, growth_interval, hysteresis, ... of the shared scaler
        return getattr(self._shared.scaler, name)


def install_grad_scaler(optimizer, config, *, growth_factor: float, backoff_factor: float):
    """Replaces the sub-optimizers' grad scalers with views of one new scaler built from the
    Megatron ``OptimizerConfig`` ``config`` and the given factors (which ``get_megatron_optimizer``
    hard-codes). Without any scaler (BF16, FP32) nothing changes. Returns the shared scaler or None."""
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    members = [sub for sub in sub_optimizers(optimizer) if getattr(sub, "grad_scaler", None) is not None]
    if not members:
        return None
    if config.loss_scale:
        scaler = ConstantGradScaler(config.loss_scale)
    else:
        scaler = DynamicGradScaler(
            initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
            growth_factor=growth_factor, backoff_factor=backoff_factor,
            growth_interval=config.loss_scale_window, hysteresis=config.hysteresis,
        )
    shared = _Shared(scaler, len(members))
    for i, sub in enumerate(members):
        sub.grad_scaler = SharedGradScaler(shared, i)
    return scaler


def unique_scalers(optimizer) -> List[Optional[object]]:
    """The distinct scalers behind ``optimizer``'s sub-optimizers (shared views resolved), in order;
    None for a sub-optimizer without one."""
    out: List[Optional[object]] = []
    seen = set()
    for sub in sub_optimizers(optimizer):
        scaler = getattr(sub, "grad_scaler", None)
        scaler = scaler.inner if isinstance(scaler, SharedGradScaler) else scaler
        if scaler is None or id(scaler) not in seen:
            out.append(scaler)
            if scaler is not None:
                seen.add(id(scaler))
    return out
