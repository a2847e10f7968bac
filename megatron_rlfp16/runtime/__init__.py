"""One entry point for torch.distributed and Megatron's parallel state, on GPU or CPU.

``init_runtime(ParallelConfig(tp=2, pp=1, ep=1))`` works the same under ``torchrun`` (reads the
usual ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables) and in a plain single process (a world of one).
On a machine without CUDA it uses gloo and installs the CPU stand-ins of :mod:`megatron_rlfp16.compat.megatron` first.
Tests, tools and examples all go through here so that they exercise one initialization path.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is whatever the world leaves over."""

    tp: int = 1
    """Tensor-parallel size (attention heads, MLP columns and the vocabulary are split across it)."""
    pp: int = 1
    """Pipeline-parallel size (decoder layers are split into this many stages)."""
    ep: int = 1
    """Expert-parallel size for MoE layers (experts are split across it, inside data parallel)."""
    etp: Optional[int] = None
    """Expert tensor-parallel size. None: the run plan chooses 1 for MoE models with ep > 1 (each
    expert whole on a rank, its state sharded over expert data parallelism) and ``tp`` otherwise;
    ``init_runtime`` given a bare ParallelConfig uses ``tp`` (Megatron's default). With ep=1 it must
    equal ``tp`` (Megatron reduces expert gradients over expert-DP ranks only under EP)."""

    def validate(self, world_size: int) -> None:
        for field in ("tp", "pp", "ep"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{field}={value!r}: must be an integer >= 1")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ValueError(f"ParallelConfig.etp={self.etp!r}: must be None or an integer >= 1")
        if world_size % (self.tp * self.pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}; "
                "choose sizes whose product divides the number of ranks"
            )
        etp = self.etp or self.tp
        if etp != self.tp and self.ep == 1:
            raise ValueError(
                f"ParallelConfig.etp={etp} with tp={self.tp} and ep=1: Megatron-Core reduces expert "
                "gradients over the expert-data-parallel ranks only when ep > 1, so with ep=1 each "
                "tensor-parallel rank would keep a partial expert gradient; valid: etp=tp "
                f"({self.tp}) or None with ep=1, or any etp with ep > 1"
            )
        if world_size % (etp * self.ep * self.pp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{self.ep}*{self.pp}"
            )

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this rank computes on: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_cuda_device() -> int:
    """This process's GPU: ``LOCAL_RANK`` among the visible ones, or the only visible one when each
    process is given its own (``CUDA_VISIBLE_DEVICES`` set per rank, as SLURM's GPU binding does).
    More processes on a node than visible GPUs is an error naming both."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < count:
        return local
    if count == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK={local} but only {count} GPU(s) are visible to this process: start one process per "
        f"GPU (torchrun --nproc_per_node={count}) or give each process its own with CUDA_VISIBLE_DEVICES"
    )


def init_runtime(
    parallel: Optional[ParallelConfig] = None,
    *,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: float = 30.0,
) -> ParallelConfig:
    """Initializes torch.distributed (if needed) and Megatron's model-parallel groups.

    Returns the validated ``ParallelConfig``. Calling it again with the same layout is a no-op;
    with a different layout it rebuilds Megatron's groups on the existing world.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel = parallel or ParallelConfig()
    on_gpu = torch.cuda.is_available()
    from megatron_rlfp16.compat import megatron as megatron_compat

    if on_gpu:
        megatron_compat.define_te_general_gemm()
    else:
        megatron_compat.install_cpu_stand_ins()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain process: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if on_gpu:
            torch.cuda.set_device(local_cuda_device())
        dist.init_process_group(
            backend=backend or ("nccl" if on_gpu else "gloo"),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = dist.get_world_size()
    parallel.validate(world)
    if parallel_state.model_parallel_is_initialized():
        if _current_layout() == (parallel.tp, parallel.pp, parallel.ep, parallel.etp or parallel.tp):
            return parallel
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
    )
    model_parallel_cuda_manual_seed(seed)
    return parallel


def _current_layout():
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def shutdown_runtime() -> None:
    """Destroys Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
