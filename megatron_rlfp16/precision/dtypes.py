"""The one dtype vocabulary of the project: ``Precision``, its spellings, and the FP32 accumulator.

Every other package asks this module for a dtype instead of spelling one: a precision chosen by a
user (``--precision fp16``, ``--dtype bfloat16``, an HF ``config.json``'s ``torch_dtype``) is parsed
here once, and each consumer reads the spelling it needs from the enum (``torch_dtype`` for torch and
Megatron, ``vllm_dtype`` for vLLM and HF configs, ``value`` for flags and file names). Numerics that
must stay in FP32 whatever the run's precision (log-softmax statistics, loss maths, counts) use
:data:`ACCUM_DTYPE`, so a reader sees the choice is deliberate.
"""
from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

__all__ = ["ACCUM_DTYPE", "ROUTER_DTYPE", "Precision", "config_precision", "dtype_name", "parse_dtype"]

# torch is imported on first use, not here: the command-line tools build their parsers from this
# module, and ``--help`` must not wait for torch (about 1.5 s).


def __getattr__(name: str):
    if name == "ACCUM_DTYPE":
        import torch

        return torch.float32
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ACCUM_DTYPE: "torch.dtype"
"""The dtype of accumulations and reductions that are FP32 in every precision mode (``torch.float32``)."""
ROUTER_DTYPE = "fp32"
"""Megatron's ``moe_router_dtype`` spelling of an FP32 router (logits, softmax, top-k)."""


class Precision(str, enum.Enum):
    """The floating-point format a whole model computes in (weights and activations)."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def torch_dtype(self) -> "torch.dtype":
        return _torch_dtypes()[self]

    @property
    def vllm_dtype(self) -> str:
        """vLLM's (and HF ``config.json``'s) spelling: "float16", "bfloat16" or "float32"."""
        return _LONG_NAMES[self]

    @property
    def is_half(self) -> bool:
        """A 16-bit format (FP16 or BF16): computes slower than FP32 on CPUs without half arithmetic."""
        return self != Precision.FP32

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The short names, for CLI ``choices``: ("fp16", "bf16", "fp32")."""
        return tuple(p.value for p in cls)

    @classmethod
    def long_names(cls) -> Tuple[str, ...]:
        """The long names, sorted, for ``--dtype`` choices: ("bfloat16", "float16", "float32")."""
        return tuple(sorted(p.vllm_dtype for p in cls))

    @classmethod
    def parse(cls, value: Union["Precision", str, "torch.dtype"], *, field: str = "precision") -> "Precision":
        """A ``Precision`` from itself, a ``torch.dtype`` or a name such as "fp16", "float16",
        "half", "torch.bfloat16" (case-insensitive). ``field`` names the setting in the error."""
        if isinstance(value, cls):
            return value
        torch = sys.modules.get("torch")  # a torch.dtype can only exist once torch is imported
        if torch is not None and isinstance(value, torch.dtype):
            for precision, dtype in _torch_dtypes().items():
                if dtype == value:
                    return precision
        elif isinstance(value, str):
            key = value.strip().lower().removeprefix("torch.")
            for precision, aliases in _ALIASES.items():
                if key in aliases:
                    return precision
        valid = ", ".join(
            f"{p.value!r} (or {', '.join(repr(a) for a in aliases if a != p.value)})"
            for p, aliases in _ALIASES.items()
        )
        raise ValueError(f"{field}={value!r} is not a precision; valid: {valid}")


def _torch_dtypes() -> dict:
    import torch

    return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}


_LONG_NAMES = {Precision.FP16: "float16", Precision.BF16: "bfloat16", Precision.FP32: "float32"}
_ALIASES = {
    Precision.FP16: ("fp16", "float16", "half", "f16"),
    Precision.BF16: ("bf16", "bfloat16"),
    Precision.FP32: ("fp32", "float32", "float", "f32"),
}


def parse_dtype(value: Union[Precision, str, "torch.dtype"], *, field: str = "dtype") -> "torch.dtype":
    """The ``torch.dtype`` of any spelling ``Precision.parse`` accepts."""
    return Precision.parse(value, field=field).torch_dtype


def dtype_name(value: Union[Precision, str, "torch.dtype"], *, field: str = "dtype") -> str:
    """The long name ("float16", ...) of any accepted spelling, as HF configs and vLLM write it."""
    return Precision.parse(value, field=field).vllm_dtype


def config_precision(cfg, default: Precision = Precision.FP32) -> Precision:
    """The precision an HF config declares (``dtype`` in transformers 5, ``torch_dtype`` in 4.x);
    ``default`` when it declares none or one this project does not train in."""
    name: Optional[str] = cfg.get("dtype") or cfg.get("torch_dtype")
    try:
        return Precision.parse(name) if name else default
    except ValueError:
        return default
