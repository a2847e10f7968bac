"""Named points where a test freezes a run so that it can kill it there, from outside, with SIGKILL.

``RLFP16_PAUSE_AT=<point>[:<n>]`` makes every process reaching ``<point>`` for the ``n``-th time (1 by
default) write its pid to ``$RLFP16_PAUSE_DIR/<point>.<rank>`` and wait there until it is killed, or
until the test creates ``<point>.<rank>.go`` beside it (then it goes on: a signal can be sent while
every rank is at a known point).
Unset (always, outside tests), :func:`pause_point` returns at once. The points:

- ``rollout-done``: a training step has sampled its batch and not yet trained on it (every rank);
- ``checkpoint-written``: a save has written every shard into its temporary directory and not yet
  swapped it in (the saving rank; the others wait in a barrier);
- ``checkpoint-swapping``: the previous checkpoint is renamed aside, the new one not yet in place;
- ``checkpoint-saved``: the trainer's save has completed (every rank).
"""
from __future__ import annotations

import os
import time

POINTS = ("rollout-done", "checkpoint-written", "checkpoint-swapping", "checkpoint-saved")
_seen: dict = {}


def pause_point(name: str) -> None:
    spec = os.environ.get("RLFP16_PAUSE_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(nth or 1):
        return
    folder = os.environ.get("RLFP16_PAUSE_DIR", ".")
    rank = os.environ.get("RANK", "0")
    path = os.path.join(folder, f"{name}.{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    while not os.path.exists(path + ".go"):  # or the test's SIGKILL
        time.sleep(0.1)
