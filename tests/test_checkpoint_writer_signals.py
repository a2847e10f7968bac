"""A SIGTERM to a rank's process group (what ``torchrun`` sends) must not kill the helper process that
Megatron's checkpoint writer reports through: the rank is about to save the step it finished, and the
save needs that helper. Found on a 2-core machine, where the signal landed inside a save and the save
failed with ``EOFError``. The helper must still end with its rank."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # like the trainer's StopRequest
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_rlfp16.checkpoint.megatron_ckpt import _start_writer_results_queue
    _start_writer_results_queue()
    queue = filesystem_async._results_queue
    print("ready", flush=True)
    while not got:
        time.sleep(0.05)
    time.sleep(0.5)  # more signals may follow
    queue.put({"rank": 0})
    print("after", got, queue.get(), flush=True)
    time.sleep(600)  # until the test kills this process
""")


def test_writer_helper_survives_the_group_sigterm_and_ends_with_its_rank():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as torchrun starts ranks
    try:
        assert proc.stdout.readline().strip() == "ready"
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert helpers, "no helper process was started"
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.1)
        line = proc.stdout.readline().strip()
        assert line.startswith("after [15") and line.endswith("{'rank': 0}"), line
        assert all(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers)
        proc.kill()  # the rank dies without a chance to clean up
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(helpers, timeout=10)
        assert not alive, f"helpers outlived their rank: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
