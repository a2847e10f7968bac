#!/usr/bin/env python
"""Print the memory plan of a run: bytes per GPU for every component and phase, and whether it fits.

    python tools/memory_plan.py --hf-config Qwen3-8B/config.json --world-size 8 --tp 2 \
        --micro-batch-size 4 --max-new-tokens 2048 --device-memory-gib 80

Needs only the HF ``config.json`` (a directory holding one, or the file); nothing is loaded or
allocated. The phases are those of a colocated run (rollout, training, refit, and the optimizer
step apart with --offload-optimizer; see docs/gpu.md). Exit status 0 when every phase fits (or no
device memory is known), 3 when one does not: the message names the largest component of that
phase and the settings that would make it fit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only torch-free modules before the arguments are parsed: --help and usage errors answer at once.
from megatron_rlfp16.cli import fraction, positive_float, positive_int  # noqa: E402
from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", required=True, help="an HF model directory or its config.json")
    p.add_argument("--world-size", type=positive_int, default=8, help="ranks (GPUs) of the run")
    p.add_argument("--tp", type=positive_int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--ep", type=positive_int, default=1, help="Megatron expert-parallel size")
    p.add_argument("--etp", type=positive_int, default=None, help="expert tensor-parallel size (default: --tp)")
    p.add_argument("--rollout-tp", type=positive_int, default=None, help="vLLM tensor-parallel size (default: --tp)")
    p.add_argument("--precision", default=Precision.FP16.value, choices=Precision.names())
    p.add_argument("--prompts-per-step", type=positive_int, default=64)
    p.add_argument("--group-size", type=positive_int, default=8)
    p.add_argument("--micro-batch-size", type=positive_int, default=4)
    p.add_argument("--max-new-tokens", type=positive_int, default=2048)
    p.add_argument("--rollout-gpu-memory-utilization", type=fraction, default=0.4)
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="shard optimizer state over data parallelism (default: on when dp > 1)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--attention", choices=["auto", "fused", "unfused"], default="fused",
                   help="the attention kernel assumed (default fused: TransformerEngine on the GPU machine)")
    p.add_argument("--device-memory-gib", type=positive_float, default=None,
                   help="memory of one GPU (default: this machine's GPU; none on CPU: no fit check)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="the trainer's state in host memory during rollout, so that phase holds only the "
                        "engine (default: on, as in a GPU run)")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with --offload, master weights and Adam moments also stay in host memory outside each "
                        "optimizer step: a training phase without them and an optimizer phase (default: on when "
                        "the run fits only this way)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import dataclasses
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

    from megatron_rlfp16.cli import with_flag
    from megatron_rlfp16.plan import MemoryConfig, MemoryPlanError, resolve_plan
    from megatron_rlfp16.plan.memory import with_offload_optimizer
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.models import read_config_json

    path = args.hf_config
    hf_dir = os.path.dirname(path) if path.endswith(".json") else path
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        else:
            cfg = read_config_json(path)
        memory = MemoryConfig(distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
                              attention=args.attention, device_memory_gib=args.device_memory_gib)
        config = TrainerConfig(
            hf_dir=hf_dir, parallel=ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp),
            rollout=RolloutConfig(tp=args.rollout_tp, gpu_memory_utilization=args.rollout_gpu_memory_utilization),
            run=RunConfig(prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                          micro_batch_size=args.micro_batch_size),
            rl=RLConfig(group_size=args.group_size), precision=PrecisionConfig(trainer=args.precision),
            memory=dataclasses.replace(memory, device_memory_gib=None),  # the fit is checked below, with --offload
        )
        plan = resolve_plan(config, world_size=args.world_size, hf_config=cfg)
        device = int(args.device_memory_gib * 2**30) if args.device_memory_gib else plan.memory.device_bytes
        if args.offload_optimizer and not args.offload:
            raise ValueError("--offload-optimizer needs --offload (the optimizer state can only stay in host "
                             "memory when the trainer's state is offloaded)")
        memory_plan = with_offload_optimizer(plan.memory.replace(device_bytes=device, offload=args.offload),
                                             args.offload_optimizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {with_flag(str(err))}", file=sys.stderr)
        return 2
    described = memory_plan.describe()
    if args.json:
        print(json.dumps(described, indent=2))
    else:
        print(format_plan(described))
    try:
        memory_plan.check()
    except MemoryPlanError as err:
        print(f"does not fit: {err}", file=sys.stderr)
        return 3
    return 0


def format_plan(described: dict) -> str:
    """A table of GiB per GPU: components as rows, phases as columns."""
    phases = described["phases_gib"]
    names = sorted({k for p in phases.values() for k in p if k != "total"},
                   key=lambda k: -max(p.get(k, 0) for p in phases.values()))
    lines = ["| GiB per GPU | " + " | ".join(phases) + " |", "| --- |" + " --- |" * len(phases)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{p[name]:.2f}" if name in p else "-" for p in phases.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p['total']:.2f}**" for p in phases.values()) + " |")
    device = described["device_gib"]
    lines.append(f"peak: {described['peak']['phase']} {described['peak']['gib']:.2f} GiB"
                 + (f" of {device:.2f} GiB" if device else " (no device memory given: not checked)"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
