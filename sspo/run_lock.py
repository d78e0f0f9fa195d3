"""One live run per output folder: an OS file lock that records its holder's pid.

The lock is ``flock`` on ``<run_dir>/.sspo.lock``: the kernel releases it when the holder dies,
however it dies, so a run killed by SIGKILL leaves no stale lock behind and ``--resume`` simply
takes it. A second run into a held folder is refused with the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import ConfigError

LOCK_FILE = ".sspo.lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"output_dir {self.path.parent} is in use by a running sspo train (pid {holder}); "
                "wait for it to finish, stop it, or set another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
