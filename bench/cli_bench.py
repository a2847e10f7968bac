"""How fast every command-line entry point answers ``--help`` and a usage error, and how long the
embedded task's tokenizer takes to fit.

Arguments are parsed before anything heavy is imported (Megatron, vLLM, transformers; torch too
where the parser does not need the loss registries), so a typo costs no more than Python's start.
Each command is run ``--rounds`` times in a fresh interpreter; the table gives the median wall time
and, as the baseline measured in the same run, a bare ``python -c pass`` and ``python -c "import
torch"``.

    python bench/cli_bench.py                  # prints the table
    python bench/cli_bench.py --json out.json  # also writes the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "python -c 'import torch' (baseline)": ["-c", "import torch"],
    "convert_checkpoint.py --help": ["tools/convert_checkpoint.py", "--help"],
    "convert_checkpoint.py import --tp 0": ["tools/convert_checkpoint.py", "import", "--hf-dir", "x",
                                            "--megatron-dir", "y", "--tp", "0"],
    "measure_mismatch.py --help": ["tools/measure_mismatch.py", "--help"],
    "measure_mismatch.py (no --out)": ["tools/measure_mismatch.py", "--hf-dir", "x"],
    "grpo_train.py --help": ["examples/grpo_train.py", "--help"],
    "grpo_train.py (no --hf-dir)": ["examples/grpo_train.py"],
    "grpo_cpu_demo.py --help": ["examples/grpo_cpu_demo.py", "--help"],
    "grpo_cpu_demo.py --steps 0": ["examples/grpo_cpu_demo.py", "--steps", "0"],
}
"""Name -> the arguments after ``python``; every one answers with exit status 0 (help) or 2 (usage)."""


def time_command(args, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 2):
            raise RuntimeError(f"{args}: exit status {proc.returncode}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def tokenizer_seconds() -> float:
    sys.path.insert(0, ROOT)
    from megatron_rlfp16.rewards import TaskConfig, TokenizerConfig, build_task, train_tokenizer

    start = time.perf_counter()
    train_tokenizer(build_task(TaskConfig(names=("copy", "reverse", "sort", "add"))), TokenizerConfig(num_samples=5000))
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="runs per command (median taken)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    results = {name: time_command(cmd, args.rounds) for name, cmd in COMMANDS.items()}
    results["fit the task tokenizer (4 tasks, 5000 samples)"] = tokenizer_seconds()
    print("| command | median wall time (s) |\n| --- | --- |")
    for name, seconds in results.items():
        print(f"| `{name}` | {seconds:.2f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
