"""Fault injection: kill the process at a named point, to prove that every save survives a crash.

``SSPO_FAULT=<point>:<n>`` sends SIGKILL to this process the ``n``-th time it reaches ``<point>``
(1-based, counted per process). A SIGKILL cannot be caught, so it is what a preempted GPU, an
OOM killer or a pulled plug does to a run. The points are named where a run writes or builds
something a later resume depends on:

- ``pool_write``        after a pool checkpoint file is written, before the pool index lists it
- ``pool_release``      after released pool checkpoints' files are emptied, before the index marks them
- ``checkpoint_save``   inside a resumable save: the state files written, not yet renamed
- ``final_save``        inside the final save: the weights written, not yet renamed
- ``validation``        while validating (after sampling, before results are logged)
- ``negatives``         between two generation chunks of an iteration's negatives
- ``latent_cache``      between two encoded shards of the latent cache
- ``step``              after an optimizer step, before it is logged

Unset (the default) costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal

POINTS = ("pool_write", "pool_release", "checkpoint_save", "final_save", "validation", "negatives", "latent_cache", "step")
ENV = "SSPO_FAULT"
_reached: dict[str, int] = {}


def parse(value: str) -> tuple[str, int]:
    point, _, count = value.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV}={value!r}: expected <point>:<n> with n >= 1 and point one of {', '.join(POINTS)}")
    return point, int(count)


def fault_point(point: str) -> None:
    """Die here by SIGKILL if ``SSPO_FAULT`` names this point and this is its ``n``-th visit."""
    value = os.environ.get(ENV)
    if not value:
        return
    target, count = parse(value)
    if target != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == count:
        os.kill(os.getpid(), signal.SIGKILL)
