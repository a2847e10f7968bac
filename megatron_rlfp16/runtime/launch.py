"""Runs a function on N real local ranks (one process each) and returns what each rank returned.

Used by the tools when started with plain ``python`` (they start their own ranks) and by the tests.

Each rank gets the usual torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port), so the function under test initializes exactly as it
would under ``torchrun``. A rank that raises sends its traceback back, and the caller's exception
shows it; a run that exceeds ``timeout`` kills every rank.

SIGTERM or SIGINT to the launching process is forwarded to every rank (which raises ``SystemExit``
there, so that ``finally`` blocks remove temporary output); ranks still running 30 s later are
killed, and the launcher raises :class:`Stopped` (exit code 128 + signal). Once one rank has ended,
the others get 5 s: a rank waiting for it inside a collective (or in the process-group rendezvous)
is in C code that does not run Python's signal handler, and would otherwise wait out the 30 s.

Ranks start with the ``spawn`` method: a fresh interpreter each, which imports torch, Megatron and
vLLM again (about 15 s on 2 CPU cores). A process that launches ranks many times (the test suite)
sets ``RLFP16_RANK_START=forkserver``: one helper process imports those packages once
(``FORKSERVER_PRELOAD``) and every rank is forked from it, already imported. Nothing else changes:
each rank is still a new process with the caller's ``sys.path``, and the environment of every launch
is applied before the function runs (variables that a package reads when it is imported take the
values the helper started with).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from typing import Any, Callable

from megatron_rlfp16.runtime import free_port


class RankFailure(RuntimeError):
    """One or more ranks failed; ``str()`` holds each failing rank's traceback."""

    def __init__(self, message: str, failures: dict | None = None):
        super().__init__(message)
        self.failures = failures or {}

    def summary(self) -> str:
        """The exception line of the first failing rank (what a command-line user needs to see)."""
        for _, tb in sorted(self.failures.items()):
            lines = [l for l in tb.strip().splitlines() if l.strip()]
            if lines:
                return lines[-1]
        return str(self)


class Stopped(RankFailure):
    """The launcher got SIGTERM/SIGINT and ended its ranks; ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, failures: dict | None = None):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: every rank was ended", failures)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def summary(self) -> str:
        return str(self)


GRACE_S = 30.0
"""How long ranks have to exit after the launcher forwarded a signal, before they are killed."""
PEER_GRACE_S = 5.0
"""After a forwarded signal, how long the ranks still running have once another rank has ended."""


START_METHODS = ("spawn", "forkserver")
FORKSERVER_PRELOAD = ("torch", "megatron.core", "megatron.core.models.gpt", "megatron_rlfp16.runtime", "transformers",
                      "vllm", "vllm.entrypoints.llm")
"""What the forkserver helper imports once; a module that fails to import there is imported by each rank."""


def start_method() -> str:
    """The rank start method from ``RLFP16_RANK_START`` (default ``spawn``)."""
    method = os.environ.get("RLFP16_RANK_START", "") or "spawn"
    if method not in START_METHODS:
        raise ValueError(f"RLFP16_RANK_START={method!r}; valid: {', '.join(START_METHODS)}")
    return method


def _context():
    method = start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


def _exit_on_signal(signum, frame):
    for s in _FORWARDED:  # one exit: a repeated signal must not interrupt the cleanup it starts
        signal.signal(s, signal.SIG_IGN)
    raise SystemExit(128 + signum)


_FORWARDED = (signal.SIGTERM, signal.SIGINT)


def _entry(fn, rank, world_size, port, env, args, kwargs, results):
    for s in _FORWARDED:
        signal.signal(s, _exit_on_signal)
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        out = _to_bytes(fn(*args, **kwargs))
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import sys

            if "megatron.core" in sys.modules:  # importing Megatron only to shut it down costs ~7 s
                from megatron_rlfp16.runtime import shutdown_runtime

                shutdown_runtime()
        except Exception:
            pass


def rank_device_env(world_size: int) -> dict:
    """Environment for ``world_size`` local ranks: on a machine with fewer visible GPUs than ranks
    they run on CPU (``CUDA_VISIBLE_DEVICES=""``, with a warning) instead of sharing a GPU by
    accident; otherwise nothing changes (rank r uses GPU r, ``LOCAL_RANK``)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < count < world_size:
        import warnings

        warnings.warn(f"{world_size} ranks but {count} GPU(s): the ranks run on CPU", RuntimeWarning, stacklevel=3)
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 600.0,
    env: dict | None = None,
    **kwargs,
) -> list:
    """Calls ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; returns results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(rank_device_env(world_size), **(env or {}))
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, env, args, kwargs, results), daemon=False)
        for r in range(world_size)
    ]
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    received: list = []

    def forward(signum, frame):
        if not received:
            received.extend((signum, time.monotonic() + GRACE_S))
        for p in procs:
            if p.is_alive():  # False for a rank not started yet: the start loop forwards to it
                os.kill(p.pid, signum)

    previous = {}  # installed before the first start: a signal while starting still ends every rank
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        for p in procs:
            p.start()
            if received:
                os.kill(p.pid, received[0])
        while len(outputs) + len(failures) < world_size:
            if received:
                deadline = min(deadline, received[1])
                alive = [p.is_alive() for p in procs]
                if not any(alive):
                    raise Stopped(received[0], failures)
                if not all(alive):  # the rest may be waiting for an ended rank in a collective
                    if len(received) == 2:
                        received.append(time.monotonic() + PEER_GRACE_S)
                    deadline = min(deadline, received[2])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if received:
                    raise Stopped(received[0], failures)
                raise RankFailure(
                    f"ranks {sorted(set(range(world_size)) - set(outputs) - set(failures))} did not "
                    f"finish within {timeout:.0f} s" + _describe(failures), failures
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in outputs and r not in failures]
                if dead:
                    time.sleep(0.5)  # a failing rank's traceback may still be in flight
                    while not results.empty():
                        rank, ok, payload = results.get()
                        if ok:
                            outputs[rank] = _from_bytes(payload)
                        else:
                            failures[rank] = payload
                    for r in dead:
                        failures.setdefault(r, f"process exited with code {procs[r].exitcode}")
                    if failures and not received:
                        raise RankFailure(_describe(failures), failures)
                continue
            if ok:
                outputs[rank] = _from_bytes(payload)
            else:
                failures[rank] = payload
                if not received:
                    raise RankFailure(_describe(failures), failures)
        if received:
            raise Stopped(received[0], failures)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        started = [p for p in procs if p.pid is not None]
        for p in started:
            p.join(timeout=5 if not failures else 1)
        for p in started:
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]


def _to_bytes(obj) -> bytes:
    # Serialized here, in the rank, so an unpicklable result fails this rank with a traceback
    # instead of dying silently in the queue's feeder thread; tensors travel detached.
    import io

    import torch

    def detach(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: detach(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(detach(v) for v in x)
        return x

    buf = io.BytesIO()
    torch.save(detach(obj), buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _describe(failures: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
