"""The few bidirectional mapping kinds every model family is built from.

A mapping ties one Megatron parameter (a canonical, *global* name: global layer index, global expert
id; see ``names.py``) to one or more Hugging Face tensors. ``*`` in a pattern stands for a number
(layer, expert), matched in order on both sides.

Both directions are written against the full tensor and a TP rank/size:

- ``to_megatron(hf, rank, size)`` -> this TP rank's shard, from the HF tensors it needs;
- ``to_hf(full, size)`` -> ``[(hf_name, hf_shape, source)]`` where ``full`` is the concatenation of all
  TP shards along ``gather_dim`` (for ``gather_dim=1`` it arrives as ``[size, rows, cols/size]``).
  ``source`` is a *view* of ``full`` whose shape refines ``hf_shape``; the exporter copies it straight
  into its bucket (``dst.view(source.shape).copy_(source)``), so no conversion makes a second full copy.
"""
from __future__ import annotations

import abc
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_rlfp16.models.hf_config import ModelArch

HfOut = Tuple[str, torch.Size, torch.Tensor]


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def _fill(pattern: str, numbers: Sequence[str]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(numbers):
        raise ValueError(f"pattern {pattern!r} has {len(parts) - 1} wildcards, got {len(numbers)} numbers")
    out = parts[0]
    for n, p in zip(numbers, parts[1:]):
        out += str(n) + p
    return out


class Mapping(abc.ABC):
    """Base class: one Megatron pattern, named HF patterns, and how the TP shards concatenate."""

    gather_dim: Optional[int] = 0
    """Dimension along which TP shards concatenate into ``full``; None: replicated (no gather)."""

    def __init__(self, megatron: str, **hf: str):
        self.megatron = megatron
        self.hf = hf
        self._regex = _pattern_regex(megatron)

    def match(self, name: str) -> Optional[Tuple[str, ...]]:
        m = self._regex.match(name)
        return m.groups() if m else None

    def hf_names(self, numbers: Sequence[str]) -> Dict[str, str]:
        """Role (e.g. ``"q"``, ``"gate"``) -> concrete HF name for the matched numbers."""
        return {role: _fill(p, numbers) for role, p in self.hf.items()}

    @property
    def is_expert(self) -> bool:
        return ".experts." in self.megatron

    @abc.abstractmethod
    def to_megatron(self, hf: Dict[str, torch.Tensor], rank: int, size: int, arch: ModelArch) -> torch.Tensor:
        """This TP rank's shard from the HF tensors, keyed by role."""

    @abc.abstractmethod
    def to_hf(self, full: torch.Tensor, size: int, arch: ModelArch, names: Dict[str, str]) -> List[HfOut]:
        """``[(hf_name, hf_shape, view of full)]`` from the concatenated shards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.megatron!r} <- {self.hf})"


def _only(hf: Dict[str, torch.Tensor]) -> torch.Tensor:
    (t,) = hf.values()
    return t


class Replicated(Mapping):
    """The same tensor on every TP rank (norms, the MoE router)."""

    gather_dim = None

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, w=hf)

    def to_megatron(self, hf, rank, size, arch):
        return _only(hf)

    def to_hf(self, full, size, arch, names):
        return [(names["w"], full.shape, full)]


class ColumnParallel(Mapping):
    """Split along the output dimension (dim 0)."""

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, w=hf)

    def to_megatron(self, hf, rank, size, arch):
        return _only(hf).chunk(size, dim=0)[rank]

    def to_hf(self, full, size, arch, names):
        return [(names["w"], full.shape, full)]


class RowParallel(Mapping):
    """Split along the input dimension (dim 1): attention output and MLP down projections."""

    gather_dim = 1

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, w=hf)

    def to_megatron(self, hf, rank, size, arch):
        return _only(hf).chunk(size, dim=1)[rank]

    def to_hf(self, full, size, arch, names):
        # full: [size, rows, cols/size] -> view [rows, size, cols/size] == HF [rows, cols] row-major.
        rows, cols = full.shape[1], full.shape[0] * full.shape[2]
        return [(names["w"], torch.Size([rows, cols]), full.permute(1, 0, 2))]


class VocabParallel(Mapping):
    """Embedding / LM head: rows padded with zeros to Megatron's padded vocabulary, then split.

    The padding rows exist only on the Megatron side; export drops them, so they never reach vLLM.
    """

    def __init__(self, megatron: str, hf: str):
        super().__init__(megatron, w=hf)

    def to_megatron(self, hf, rank, size, arch):
        w = _only(hf)
        padded = arch.padded_vocab_size(size)
        if w.shape[0] != arch.vocab_size:
            raise ValueError(
                f"{self.hf['w']}: {w.shape[0]} rows but config vocab_size={arch.vocab_size}"
            )
        rows = padded // size
        shard = torch.zeros((rows,) + tuple(w.shape[1:]), dtype=w.dtype)
        lo = rank * rows
        hi = min(lo + rows, arch.vocab_size)
        if hi > lo:
            shard[: hi - lo] = w[lo:hi]
        return shard

    def to_hf(self, full, size, arch, names):
        return [(names["w"], torch.Size((arch.vocab_size,) + tuple(full.shape[1:])), full[: arch.vocab_size])]


class QKV(Mapping):
    """Fused ``linear_qkv``: rows interleaved by query group ``[q_0..q_{g-1}, k, v]`` per KV head.

    The full interleaved tensor is split evenly along dim 0. When ``num_query_groups < TP`` the split
    cuts inside a group: Megatron-Core all-gathers the projection and picks its heads, so the stored
    layout is still the plain even split of the full tensor. Works for weights and (1-D) biases.
    """

    def __init__(self, megatron: str, q: str, k: str, v: str):
        super().__init__(megatron, q=q, k=k, v=v)

    @staticmethod
    def _dims(arch: ModelArch):
        g = arch.num_kv_heads
        return g, arch.num_heads // g, arch.head_dim

    def to_megatron(self, hf, rank, size, arch):
        g, per, d = self._dims(arch)
        q, k, v = hf["q"], hf["k"], hf["v"]
        rest = tuple(q.shape[1:])
        for role, t, heads in (("q", q, g * per), ("k", k, g), ("v", v, g)):
            if t.shape[0] != heads * d:
                raise ValueError(
                    f"{self.hf[role]}: shape {tuple(t.shape)} does not match {heads} heads x head_dim {d}"
                )
        full = torch.cat(
            [q.reshape((g, per * d) + rest), k.reshape((g, d) + rest), v.reshape((g, d) + rest)], dim=1
        ).reshape((g * (per + 2) * d,) + rest)
        return full.chunk(size, dim=0)[rank]

    def to_hf(self, full, size, arch, names):
        g, per, d = self._dims(arch)
        rest = tuple(full.shape[1:])
        grouped = full.view((g, per + 2, d) + rest)
        return [
            (names["q"], torch.Size((g * per * d,) + rest), grouped[:, :per]),
            (names["k"], torch.Size((g * d,) + rest), grouped[:, per]),
            (names["v"], torch.Size((g * d,) + rest), grouped[:, per + 1]),
        ]


class GatedMLP(Mapping):
    """Fused ``linear_fc1 = [gate; up]``: each TP shard holds its slice of gate, then of up."""

    def __init__(self, megatron: str, gate: str, up: str):
        super().__init__(megatron, gate=gate, up=up)

    def to_megatron(self, hf, rank, size, arch):
        gate, up = hf["gate"], hf["up"]
        if gate.shape != up.shape:
            raise ValueError(
                f"{self.hf['gate']} {tuple(gate.shape)} and {self.hf['up']} {tuple(up.shape)} differ in shape"
            )
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)

    def to_hf(self, full, size, arch, names):
        rest = tuple(full.shape[1:])
        f = full.shape[0] // (2 * size)
        halves = full.view((size, 2, f) + rest)
        shape = torch.Size((size * f,) + rest)
        return [(names["gate"], shape, halves[:, 0]), (names["up"], shape, halves[:, 1])]
