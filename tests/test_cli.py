"""Every command-line entry point answers ``--help`` and a usage error at once: arguments are parsed
before anything heavy is imported. Timings belong in bench/cli_bench.py (figures in
docs/benchmarks.md); here the bound is generous (a regression to importing Megatron or vLLM first
costs 10-25 s) and the structural property is checked exactly: which parsers import no torch."""
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

TORCH_FREE = ["tools/convert_checkpoint.py", "tools/measure_mismatch.py", "tools/compare_runs.py", "examples/grpo_cpu_demo.py"]
"""Entry points whose parsers need no torch (grpo_train.py lists the registered losses, which are torch code)."""

USAGE_ERRORS = [
    (["tools/convert_checkpoint.py", "import", "--hf-dir", "h", "--megatron-dir", "m", "--tp", "0"],
     "argument --tp: 0 is invalid; valid: an integer >= 1"),
    (["tools/convert_checkpoint.py", "export", "--hf-dir", "h", "--megatron-dir", "m", "--max-shard-size", "0"],
     "argument --max-shard-size: 0 is invalid; valid: a finite number > 0"),
    (["tools/measure_mismatch.py", "--hf-dir", "h", "--out", "o", "--num-prompts", "-1"],
     "argument --num-prompts: -1 is invalid; valid: an integer >= 1"),
    (["tools/measure_mismatch.py", "--hf-dir", "h", "--out", "o", "--temperature", "0"],
     "argument --temperature: 0 is invalid; valid: a finite number > 0"),
    (["tools/measure_mismatch.py", "--hf-dir", "h"], "the following arguments are required: --out"),
    (["examples/grpo_cpu_demo.py", "--steps", "0"], "argument --steps: 0 is invalid; valid: an integer >= 1"),
    (["examples/grpo_cpu_demo.py", "--keep-checkpoints", "0"], "argument --keep-checkpoints: 0 is invalid"),
    (["examples/grpo_train.py"], "the following arguments are required: --hf-dir"),
    (["examples/grpo_train.py", "--hf-dir", "h", "--prompts-per-step", "-4"],
     "argument --prompts-per-step: -4 is invalid; valid: an integer >= 1"),
    (["examples/grpo_train.py", "--hf-dir", "h", "--rollout-gpu-memory-utilization", "1.5"],
     "argument --rollout-gpu-memory-utilization: 1.5 is invalid; valid: a number in (0, 1]"),
    (["examples/grpo_train.py", "--hf-dir", "h", "--rl-group-size", "0"],
     "argument --rl-group-size: 0 is invalid; valid: an integer >= 1"),
    (["examples/grpo_train.py", "--hf-dir", "h", "--save-every", "-1"],
     "argument --save-every: -1 is invalid; valid: an integer >= 0"),
]


def run(args, *flags):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *flags, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("script", TORCH_FREE)
def test_help_imports_no_torch(script):
    proc, _ = run([script, "--help"], "-X", "importtime")
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "megatron_rlfp16.cli" in imported
    assert not {"torch", "megatron", "vllm", "transformers"} & imported


@pytest.mark.parametrize("args,message", USAGE_ERRORS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in
                                                            enumerate(USAGE_ERRORS)])
def test_usage_errors_answer_at_once_and_name_the_flag(args, message):
    proc, seconds = run(args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert seconds < 15, seconds  # generous: the figures are in docs/benchmarks.md


@pytest.mark.parametrize("script", TORCH_FREE + ["examples/grpo_train.py"])
def test_help_answers_at_once(script):
    proc, seconds = run([script, "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert seconds < 15, seconds
