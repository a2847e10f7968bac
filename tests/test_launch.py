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
