"""FP32 islands: the parts of an FP16 (or BF16) model that compute in FP32, on both sides.

One mechanism, two kinds, one marker (``module._rlfp16_island``, read with :func:`island_kind`):

- ``IslandKind.COMPUTE`` (:func:`apply_fp32_lm_head`): the weight stays in the model's precision
  (it is what the optimizer updates and the rollout engine receives) and each forward multiplies
  FP32 copies. The LM head is the one such island; vLLM's ``head_dtype="float32"`` is its mirror.
- ``IslandKind.PROMOTED`` (:func:`promote_to_fp32`): parameters and buffers are cast to FP32 and
  inputs upcast, outputs cast back; for modules the overflow guard names.

A module is an island of at most one kind: asking again (either kind) is a no-op.
"""
from __future__ import annotations

import collections
import contextlib
import difflib
import enum
import types
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

__all__ = ["IslandKind", "apply_fp32_lm_head", "island_kind", "promote_to_fp32"]

ModuleFilter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


class IslandKind(str, enum.Enum):
    COMPUTE = "compute"
    """FP32 arithmetic on FP32 copies; the stored weight keeps the model's precision."""
    PROMOTED = "promoted"
    """Parameters and buffers stored in FP32."""


def island_kind(module: nn.Module) -> Optional[IslandKind]:
    """The island ``module`` was made into, or None."""
    return getattr(module, "_rlfp16_island", None)


def apply_fp32_lm_head(model) -> List[str]:
    """Makes each Megatron output layer (``...output_layer``) compute its logits in FP32.

    The weight stays in the model's dtype (it is what the optimizer updates and what the rollout
    engine receives); each forward multiplies an FP32 copy of the input by an FP32 copy of the
    weight, which is what vLLM does with ``hf_overrides={"head_dtype": "float32"}``. Gradients flow
    back through the casts to the FP16 weight and hidden states. Extra memory: the FP32 weight copy
    and FP32 logits held for the backward. Works through DDP wrappers and on every pipeline stage
    (stages without an output layer are left alone); calling it twice is a no-op.

    Raises:
        ValueError: the layer fuses weight-gradient accumulation into ``main_grad``
            (``gradient_accumulation_fusion``), which needs the weight itself in the matmul.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear

    changed = []
    for name, module in model.named_modules():
        if not (name.split(".")[-1] == "output_layer" and isinstance(module, ColumnParallelLinear)):
            continue
        if island_kind(module) is not None:
            continue
        if getattr(module, "gradient_accumulation_fusion", False):
            raise ValueError(
                f"{name}: gradient_accumulation_fusion=True accumulates the weight gradient in place "
                "and cannot run on an FP32 copy of the weight; set gradient_accumulation_fusion=False "
                "or PrecisionConfig.fp32_logits=False"
            )
        module.forward = types.MethodType(_fp32_head_forward, module)
        module._rlfp16_island = IslandKind.COMPUTE
        changed.append(name)
    return changed


def _fp32_head_forward(self, input_, weight=None, runtime_gather_output=None):
    weight = self.weight if weight is None else weight  # a tied embedding arrives as `weight`
    if weight is None:  # let Megatron raise its own "weight was not supplied" error
        return type(self).forward(self, input_, None, runtime_gather_output)
    return type(self).forward(
        self, input_.to(ACCUM_DTYPE), weight=weight.to(ACCUM_DTYPE), runtime_gather_output=runtime_gather_output
    )


def promote_to_fp32(model: nn.Module, names: Union[str, Iterable[str]]) -> List[str]:
    """Makes the named submodules run in FP32 inside an otherwise FP16 (or BF16) model.

    Each named module gets its parameters and buffers cast to float32 (in place: the Parameter
    objects stay the same, but an optimizer or DDP wrapper built earlier has captured their old
    dtype, so call this before building those), and its forward wrapped so that floating inputs are
    cast to float32, autocast is off inside, and float32 outputs (a tensor, or tensors nested in
    tuples, lists and dicts) are cast back to the dtype of the first floating input, or when there
    is none (token ids into an embedding) to the module's parameter dtype before promotion.

    The cast back means an output that does not fit FP16 still overflows at the island's edge;
    promote the block that brings values back into range (e.g. a whole MLP, not only its
    up-projection). Promoting a module twice is a no-op. Returns the promoted names.

    Raises:
        ValueError: a name is not in ``model.named_modules()``; the message lists close matches
            and a few valid names.
    """
    targets = _select_modules(model, [names] if isinstance(names, str) else list(names))
    for _, module in targets:
        if island_kind(module) is not None:
            continue
        floating = [t for t in _parameters_and_buffers(module) if t.is_floating_point()]
        module._rlfp16_fp32_fallback_dtype = floating[0].dtype if floating else None
        module.to(ACCUM_DTYPE)
        module._rlfp16_island = IslandKind.PROMOTED
        # A bound method (not a closure) so copy.deepcopy rebinds it to the copy.
        module.forward = types.MethodType(_fp32_island_forward, module)
    return [name for name, _ in targets]


def _fp32_island_forward(self: nn.Module, *args, **kwargs):
    inputs = list(_floating_tensors((args, kwargs)))
    out_dtype = inputs[0].dtype if inputs else self._rlfp16_fp32_fallback_dtype
    device_type = inputs[0].device.type if inputs else _module_device_type(self)
    args, kwargs = _cast_floating((args, kwargs), ACCUM_DTYPE)
    no_autocast = contextlib.nullcontext()
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        no_autocast = torch.autocast(device_type=device_type, enabled=False)
    with no_autocast:
        out = type(self).forward(self, *args, **kwargs)
    if out_dtype is None or out_dtype == ACCUM_DTYPE:
        return out
    return _cast_floating(out, out_dtype, only=ACCUM_DTYPE)


# -- helpers -------------------------------------------------------------------------------------


def _floating_tensors(obj) -> Iterator[torch.Tensor]:
    """Floating-point tensors in ``obj``, looking inside tuples, lists and dict values."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _floating_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _floating_tensors(item)


def _cast_floating(obj, dtype: torch.dtype, only: Optional[torch.dtype] = None):
    """``obj`` with its floating tensors (those of dtype ``only``, if given) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        wanted = obj.is_floating_point() if only is None else obj.dtype == only
        return obj.to(dtype) if wanted else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_cast_floating(x, dtype, only) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floating(x, dtype, only) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floating(v, dtype, only)) for k, v in obj.items())
    return obj


def _parameters_and_buffers(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _module_device_type(module: nn.Module) -> str:
    for t in _parameters_and_buffers(module):
        return t.device.type
    return "cpu"


def _select_modules(model: nn.Module, modules: ModuleFilter) -> List[Tuple[str, nn.Module]]:
    named = collections.OrderedDict(model.named_modules())
    if modules is None:
        return [(name, m) for name, m in named.items() if name != ""]
    if callable(modules) and not isinstance(modules, nn.Module):
        return [(name, m) for name, m in named.items() if modules(name, m)]
    wanted = [modules] if isinstance(modules, str) else list(modules)
    unknown = [name for name in wanted if name not in named]
    if unknown:
        valid = [name for name in named if name]
        hints = sorted({m for name in unknown for m in difflib.get_close_matches(name, valid, n=3)})
        raise ValueError(
            f"unknown module name(s) {unknown} in {type(model).__name__}"
            + (f"; did you mean {hints}?" if hints else "")
            + f" Valid names include {valid[:8]}"
            + (f" (and {len(valid) - 8} more)" if len(valid) > 8 else "")
        )
    if not wanted:
        raise ValueError("no module names given; pass at least one name from named_modules()")
    return [(name, named[name]) for name in dict.fromkeys(wanted)]
