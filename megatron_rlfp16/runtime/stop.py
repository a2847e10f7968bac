"""Clean shutdown on SIGTERM / SIGINT: finish the step, save, exit non-zero.

``torchrun`` forwards SIGTERM and SIGINT to every worker (and kills what is still running after its
shutdown timeout, 30 s by default); so do the package's own launcher
(:func:`megatron_rlfp16.runtime.launch.run_on_ranks`) and ``examples/grpo_cpu_demo.sh``. A rank that
gets the signal only records it: the trainer asks all ranks at the end of every step
(:meth:`StopRequest.agreed`, one small all-reduce), and when any rank was signalled every rank saves
the checkpoint of the step it just finished and raises :class:`RunStopped`. The entry points turn
that into exit code ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for a
process ended by a signal. A second signal does not wait: it gets the default action (SIGINT raises
KeyboardInterrupt, SIGTERM ends the process).
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run stopped early on a signal, after saving the checkpoint of ``step``."""

    def __init__(self, signum: int, step: int):
        self.signum = int(signum)
        self.step = int(step)
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {self.step}; "
                         "the checkpoint of that step is saved and the run resumes from it")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """``with StopRequest() as stop:`` records SIGTERM/SIGINT instead of dying (main thread only;
    elsewhere it records nothing and the signals keep their handlers). The previous handlers come
    back when the block ends or a second signal arrives."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self._restore()  # the second signal: the default action, now
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self) -> int:
        """Collective when torch.distributed is initialized: the signal any rank got (0: none), the
        same on every rank so that all of them stop after the same step."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([self.signum or 0], dtype=torch.int64)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                value = value.cuda()
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())


def detach_from_stop_signals(parent_pid: int) -> None:
    """Run in a helper process a rank starts (as its ``initializer``): it ignores SIGTERM/SIGINT and
    dies with the rank instead. ``torchrun`` signals a rank's whole process group, helpers included;
    a helper the rank still needs to finish its last step and save must survive that signal."""
    import ctypes
    import os

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:  # Linux: SIGKILL when the parent exits, however it exits
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent ended before prctl took effect
        os._exit(0)
