"""The local rank launcher's start methods: ``spawn`` (the default) and ``forkserver`` (one helper
that imported torch, Megatron and vLLM once forks every rank; the test suite's setting)."""
import os

import pytest

from megatron_rlfp16.runtime import launch
from megatron_rlfp16.testing.distributed import RankFailure, run_on_ranks


def test_start_method_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("RLFP16_RANK_START", raising=False)
    assert launch.start_method() == "spawn"
    monkeypatch.setenv("RLFP16_RANK_START", "forkserver")
    assert launch.start_method() == "forkserver"
    monkeypatch.setenv("RLFP16_RANK_START", "fork")
    with pytest.raises(ValueError, match=r"RLFP16_RANK_START='fork'; valid: spawn, forkserver"):
        launch.start_method()


def _describe_rank(name):
    import sys

    import torch.distributed as dist

    return dict(pid=os.getpid(), value=os.environ.get(name), rank=int(os.environ["RANK"]),
                preloaded="megatron.core" in sys.modules, initialized=dist.is_initialized())


def _fail_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one fails")
    return "ok"


@pytest.mark.ranks
@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_every_launch_gets_fresh_ranks_with_its_own_environment(monkeypatch, start):
    monkeypatch.setenv("RLFP16_RANK_START", start)
    first = run_on_ranks(_describe_rank, 2, "RLFP16_TEST_VALUE", env={"RLFP16_TEST_VALUE": "a"})
    second = run_on_ranks(_describe_rank, 2, "RLFP16_TEST_VALUE", env={"RLFP16_TEST_VALUE": "b"})
    assert [r["rank"] for r in first] == [0, 1] and [r["value"] for r in first] == ["a", "a"]
    assert [r["value"] for r in second] == ["b", "b"]
    pids = {r["pid"] for r in first + second}
    assert len(pids) == 4 and os.getpid() not in pids  # a new process per rank and launch
    assert not any(r["initialized"] for r in first + second)  # nothing inherited but imports
    # Only the fork server's ranks start with Megatron imported (the point of it).
    assert all(r["preloaded"] for r in first) == (start == "forkserver")
    with pytest.raises(RankFailure, match="rank one fails"):
        run_on_ranks(_fail_on_rank_one, 2)


def _rank_one_waits_in_c(ready_dir):
    """Rank 0 waits in Python (a forwarded signal ends it at once); rank 1 waits inside a C call that
    does not run Python's signal handlers (a store key nobody sets, as a rank waiting for a dead
    peer in a rendezvous or collective does)."""
    import datetime
    import time

    rank = os.environ["RANK"]
    open(os.path.join(ready_dir, rank), "w").close()
    if rank == "0":
        while True:
            time.sleep(0.05)
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=300))
    open(os.path.join(ready_dir, "waiting"), "w").close()
    store.wait(["never-set"])


@pytest.mark.ranks
def test_a_signal_ends_ranks_stuck_in_c_soon_after_their_peer(tmp_path):
    """SIGTERM to the launcher: rank 0 ends at once; rank 1 cannot run the handler, so the launcher
    kills it once rank 0 has been gone for ``PEER_GRACE_S`` instead of waiting out ``GRACE_S``."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_launch import _rank_one_waits_in_c; "
            "from megatron_rlfp16.testing.distributed import run_on_ranks; "
            "run_on_ranks(_rank_one_waits_in_c, 2, sys.argv[2], timeout=300)")
    proc = subprocess.Popen([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RLFP16_RANK_START="spawn"))
    deadline = time.monotonic() + 120
    while not {"0", "waiting"} <= set(os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert launch.PEER_GRACE_S < took < launch.GRACE_S - 10, (took, err[-2000:])
    assert proc.returncode != 0 and "stopped by SIGTERM" in err, err[-2000:]
