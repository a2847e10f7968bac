"""What the FP16 overflow guard costs a training step, as a ratio measured in one run.

A small stack of ``nn.TransformerEncoderLayer`` blocks (float32 on CPU, sized for roughly 50 ms a
forward+backward on 2 cores) is timed three ways, interleaved round by round so that drift in
machine load hits every configuration alike:

- ``baseline``     no hooks
- ``guard``        ``OverflowGuard`` on every submodule, activations only
- ``guard+grads``  the same plus gradient tracking (``track_grads=True``)

Each guarded step includes ``guard.step()`` with ``check_every=1``, the most expensive setting
(one host sync per step). The ratio is median(guarded) / median(baseline). The per-tensor cost
divides the extra time by the number of tensors the guard reduced in a step, which is the number
to scale by when guessing the overhead of a bigger model.

    python bench/guard_bench.py                  # prints the table
    python bench/guard_bench.py --json out.json  # also writes the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from megatron_rlfp16.precision import OverflowGuard  # noqa: E402


def build_model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [
        nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0,
                                   batch_first=True)
        for _ in range(layers)
    ]
    return nn.Sequential(*blocks, nn.Linear(width, width))


def train_step(model: nn.Module, x: torch.Tensor, guard: OverflowGuard | None) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    if guard is not None:
        guard.step()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.width)
    x = torch.randn(args.batch, args.seq, args.width)
    configs = {
        "baseline": None,
        "guard": OverflowGuard(model),
        "guard+grads": OverflowGuard(model, track_grads=True),
    }
    times = {name: [] for name in configs}
    names = list(configs)
    for round_ in range(args.warmup + args.steps):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            guard = configs[name]
            if guard is not None:
                guard.attach()
            elapsed = train_step(model, x, guard)
            if guard is not None:
                guard.detach()
            if round_ >= args.warmup:
                times[name].append(elapsed)

    base = statistics.median(times["baseline"])
    rows = []
    for name, guard in configs.items():
        median = statistics.median(times[name])
        tensors = 0 if guard is None else sum(s.count for s in guard.report(top_k=None))
        per_step = tensors / (args.warmup + args.steps)
        extra_us = (median - base) * 1e6
        rows.append({
            "config": name,
            "hooked_modules": 0 if guard is None else len(guard.module_names),
            "tensors_per_step": per_step,
            "median_ms": median * 1e3,
            "p10_ms": _quantile(times[name], 0.1) * 1e3,
            "p90_ms": _quantile(times[name], 0.9) * 1e3,
            "ratio": median / base,
            "us_per_tensor": extra_us / per_step if per_step else None,
        })
    return {
        "model": {"layers": args.layers, "width": args.width, "batch": args.batch, "seq": args.seq},
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }


def _quantile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"guard overhead: {m['layers']} x TransformerEncoderLayer(d={m['width']}), "
          f"batch {m['batch']} x {m['seq']} tokens, float32 CPU, {result['threads']} threads, "
          f"{result['steps']} interleaved steps per config (median)")
    header = f"{'config':<12} {'modules':>7} {'tensors':>7} {'median ms':>10} " \
             f"{'p10 ms':>8} {'p90 ms':>8} {'ratio':>7} {'us/tensor':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        per_tensor = "-" if r["us_per_tensor"] is None else f"{r['us_per_tensor']:.1f}"
        print(f"{r['config']:<12} {r['hooked_modules']:>7} {r['tensors_per_step']:>7.0f} "
              f"{r['median_ms']:>10.2f} {r['p10_ms']:>8.2f} {r['p90_ms']:>8.2f} "
              f"{r['ratio']:>7.3f} {per_tensor:>9}")
    ratios = {r["config"]: r["ratio"] for r in result["rows"]}
    print(f"overhead ratio: guard {ratios['guard']:.3f}x, guard+grads {ratios['guard+grads']:.3f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per config")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
