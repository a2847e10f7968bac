#!/usr/bin/env python
"""Compare finished runs from their ``metrics.jsonl``: reward curve and training-inference mismatch.

    python tools/compare_runs.py runs/demo-lora-fp16 runs/demo-lora-bf16
    python tools/compare_runs.py runs/a runs/b --window 20 --min-reward 0.9 --json

One Markdown row per run: steps, the trainer's count of skipped optimizer steps at the end (FP16
overflows, the warm start's included), the mean over all steps of each
step's ``mismatch/prob_diff_mean`` and ``mismatch/kl_k3``, the same mean over only the steps whose
reward is at least ``--min-reward`` (the mismatch grows with the policy's entropy, so runs whose
rewards differ compare more fairly on steps of similar reward), and the reward averaged over
consecutive windows of ``--window`` steps. Reads nothing but the JSON lines; imports no torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlfp16.cli import positive_int  # noqa: E402

METRICS = "metrics.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--window", type=positive_int, default=10, help="steps per reward average (default 10)")
    p.add_argument("--min-reward", type=float, default=0.9,
                   help="the reward from which a step counts in the matched mismatch mean (default 0.9)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def read_rows(path: str) -> list[dict]:
    """The run's metric rows, one per step; a clear error for a missing file or a damaged line."""
    file = os.path.join(path, METRICS) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r}: no {METRICS} (give a run's --out directory or the file)")
    rows = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{number}: not a JSON line ({e.msg})") from None
            if "reward" not in row:
                raise ValueError(f"{file}:{number}: has no 'reward'; valid: a trainer's metrics.jsonl")
            rows.append(row)
    if not rows:
        raise ValueError(f"{file}: holds no steps")
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def compare(rows: list[dict], *, window: int, min_reward: float) -> dict:
    """The figures of one run (see the module docstring)."""
    rewards = [float(r["reward"]) for r in rows]

    def mismatch(key, selected):
        return _mean([float(r[key]) for r in selected if r.get(key) is not None])

    matched = [r for r in rows if float(r["reward"]) >= min_reward]
    return dict(
        steps=len(rows),
        skipped_steps=int(max(float(r.get("skipped_steps") or 0) for r in rows)),
        prob_diff_mean=mismatch("mismatch/prob_diff_mean", rows),
        kl_k3=mismatch("mismatch/kl_k3", rows),
        matched_steps=len(matched),
        matched_prob_diff_mean=mismatch("mismatch/prob_diff_mean", matched),
        reward_windows=[_mean(rewards[i:i + window]) for i in range(0, len(rewards), window)],
    )


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def table(results: dict[str, dict], *, window: int, min_reward: float) -> str:
    lines = [f"| run | steps | skipped | prob_diff_mean | kl_k3 | prob_diff_mean, reward >= {min_reward:g} (steps) "
             f"| reward, {window}-step means |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['skipped_steps']} | {_fmt(r['prob_diff_mean'], '.2e')} | "
                     f"{_fmt(r['kl_k3'], '.1e')} | {_fmt(r['matched_prob_diff_mean'], '.2e')} ({r['matched_steps']}) | "
                     + ", ".join(f"{w:.2f}" for w in r["reward_windows"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = {path: compare(read_rows(path), window=args.window, min_reward=args.min_reward) for path in args.runs}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results, window=args.window, min_reward=args.min_reward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
