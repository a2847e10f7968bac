"""A multi-node launch on one machine: two ``torchrun`` agents, one per "node", each starting one
process (``--nnodes 2 --nproc-per-node 1 --node-rank N``), meet over a loopback rendezvous and run the
embedded demo for a few RL steps. Each process has LOCAL_RANK 0 and its own colocated engine; global
rank 0 alone writes the run's files."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from megatron_rlfp16.runtime import free_port

pytestmark = pytest.mark.vllm
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_two_nodes_of_one_process_train_together(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    demo = ["examples/grpo_cpu_demo.py", "--out", str(out), "--tp", "1", "--rollout-tp", "1",
            "--steps", "3", "--warm-start-steps", "2", "--prompts-per-step", "4", "--group-size", "4",
            "--micro-batch-size", "8", "--updates-per-step", "1", "--no-resume"]
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--rdzv-backend", "static", "--rdzv-endpoint", f"127.0.0.1:{port}",
             *demo],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=600)[0])
    finally:
        for agent in agents:
            agent.kill()
    for node, (agent, log) in enumerate(zip(agents, logs)):
        assert agent.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by global rank 0
    assert all(r["num_seqs"] == 16 for r in rows)  # 4 prompts x 4 samples, over both nodes
    assert all(r["mismatch/prob_diff_mean"] < 1e-2 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
