"""Independent runs side by side in one-thread worker processes (``--jobs``).

The tiny worlds' models gain little from torch's intra-op threads, and on a small shared CPU threads
spinning against another process slow a step many times over; so each run gets its own process with
one thread, and ``jobs`` of them go at once. Workers draw no progress bars: one bar here counts
finished runs, and their warnings are printed here, above it. With one job everything runs in this
process, one after another, with its own bars, on one thread too where there is no GPU: a run's
numbers do not depend on ``jobs``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from sspo.errors import SSPOError
from sspo.logs import set_up_logging

T = TypeVar("T")


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs() -> int:
    """One run at a time on a GPU (the runs share it); one per core on a CPU."""
    import torch

    return 1 if torch.cuda.is_available() else available_cores()


_stopped_by: int | None = None  # in a worker: the signal that stopped it


def _leave_quietly(signum, frame) -> None:
    """Ctrl-C reaches every worker too; the parent reports it in one line, so a worker leaves without
    a traceback (SystemExit unwinds a task's cleanup as KeyboardInterrupt would)."""
    global _stopped_by
    _stopped_by = signum
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL + 1)  # its log of a stopped set-up
    raise SystemExit(128 + signum)


def _exit_with(parent: int) -> None:
    """Leave once ``parent`` is gone (killed by SIGKILL, which no handler sees): a worker would
    otherwise finish its run and then wait for tasks forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(128 + signal.SIGKILL)


class _Forwarder:
    """Gives the workers' log records to this process's loggers of the same names, whose handlers
    print them above the bar. Its own thread reads with a timeout and is told to stop by a flag,
    never through the queue: a worker killed while writing to it can leave the queue's write lock
    held, and a stop message behind that lock would never arrive."""

    def __init__(self, records: multiprocessing.Queue):
        self.records = records
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._forward, daemon=True)
        self.thread.start()

    def _forward(self) -> None:
        while not (self.done.is_set() and self.records.empty()):  # what the workers wrote before they ended, too
            try:
                record = self.records.get(timeout=0.1)
            except queue.Empty:
                continue
            except (EOFError, OSError):  # a worker died mid-write: the rest of its records are lost with it
                return
            logging.getLogger(record.name).handle(record)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _set_up_worker(verbose: bool, records: multiprocessing.Queue) -> None:
    # A worker's own INFO lines and bars would interleave with the others'; warnings and errors
    # still show. Bars are silenced here, where they are made, because sspo's bars pass `disable`
    # themselves (off outside the main process of a launch), which TQDM_DISABLE cannot override.
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, _leave_quietly)
    set_up_logging(verbose, level=None if verbose else logging.WARNING)
    # Printed here, a record would land inside the parent's bar line, which only the parent can clear.
    logging.getLogger().handlers = [logging.handlers.QueueHandler(records)]
    logging.captureWarnings(True)
    from tqdm import std

    draw = std.tqdm.__init__

    def silent(self, *args, **kwargs):
        draw(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = silent


def _in_worker(task: Callable[[], T]) -> T:
    if _stopped_by is not None:  # queued to this worker before the stop, which cancelling cannot reach
        raise SystemExit(128 + _stopped_by)
    try:
        return task()
    except SSPOError as exc:  # subclasses with their own constructors do not survive pickling
        raise SSPOError(str(exc)) from None


def run_all(tasks: Sequence[Callable[[], T]], jobs: int, desc: str) -> list[T]:
    """Each task's result, in the tasks' order; ``jobs`` tasks at a time. Tasks must pickle (module
    functions, or ``functools.partial`` of one). The first failure stops the rest and is raised."""
    if jobs <= 1 or len(tasks) <= 1:
        import torch

        from sspo.models.tiny import one_thread

        # One thread where there is no GPU, as each worker has: a run's float rounding does not depend on jobs.
        with contextlib.nullcontext() if torch.cuda.is_available() else one_thread():
            return [task() for task in tasks]
    from tqdm.auto import tqdm

    # Spawned workers read these when they import torch; this process imported it already.
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    context = multiprocessing.get_context("spawn")
    records = context.Queue()
    forwarder = _Forwarder(records)
    try:
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context, initializer=_set_up_worker,
                                                    initargs=(logging.getLogger().isEnabledFor(logging.DEBUG), records)) as pool:
            futures = [pool.submit(_in_worker, task) for task in tasks]
            try:
                with tqdm(total=len(tasks), desc=desc, unit="run") as bar:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                        bar.update()
            except BaseException:
                workers = list((pool._processes or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)  # the executor cancels what has not started, under its own lock
                # A Ctrl-C sent to this process alone (kill -INT, a scheduler's stop) reaches no worker:
                # passed on, it stops their runs now, and the pool's shutdown does not wait for them to finish.
                for process in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGINT)
                raise
    finally:
        forwarder.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [future.result() for future in futures]
