"""Renamed public names keep working: the old spelling warns once per process and maps onto the new.

Public names are stable (docs/architecture.md): a documented flag, config field or function, once
renamed or moved, stays accepted with a ``DeprecationWarning`` naming its new home. The warning is
issued once per old name, so a loop that builds many configs does not flood the log.
"""
from __future__ import annotations

import warnings
from typing import Set

__all__ = ["warn_renamed"]

_warned: Set[str] = set()


def warn_renamed(old: str, new: str) -> None:
    """Warns (once per ``old``) that ``old`` is now spelled ``new``."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is deprecated and will be removed; use {new}", DeprecationWarning, stacklevel=3)
