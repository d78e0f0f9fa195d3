"""One live run per output folder: an OS file lock, and a file naming its holder's pid.

The lock is an OS lock on ``<run_dir>/.sspo.lock`` (the filelock package: ``flock`` on Unix,
``LockFileEx`` on Windows): the OS releases it when the holder dies, however it dies, so a run
killed by SIGKILL leaves no stale lock behind and ``--resume`` simply takes it. The holder writes
its pid into ``.sspo.pid`` (the lock file itself cannot carry it: on Windows its locked byte cannot
be read by another process); a second run into a held folder is refused with that pid.

A run that ends removes both files while it still holds the lock, so a finished run's folder holds
only what the run wrote. A run waiting on the removed file cannot take it: filelock passes over a
lock file that was unlinked before its lock was granted (and Windows keeps a locked file in place).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sspo.errors import ConfigError
from sspo.io import atomic_write_text

LOCK_FILE = ".sspo.lock"
HOLDER_FILE = ".sspo.pid"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.holder_path = Path(run_dir) / HOLDER_FILE
        self._lock = None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path), timeout=0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            atomic_write_text(self.holder_path, f"{os.getpid()}\n")  # replaces a link there rather than writing into the file it names
        except Timeout:
            raise ConfigError(
                f"output_dir {self.path.parent} is in use by a running sspo train (pid {self.holder()}); "
                "wait for it to finish, stop it, or set another output_dir"
            ) from None
        except OSError as exc:
            if lock.is_locked:
                lock.release()
            raise ConfigError(f"cannot write output_dir {self.path.parent}: {exc.strerror or exc}; choose a folder you can write to") from None
        self._lock = lock
        return self

    def holder(self) -> str:
        """The pid the holder wrote (``unknown`` while it has not written it yet)."""
        try:
            return self.holder_path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._lock is not None:
            for path in (self.holder_path, self.path):
                with contextlib.suppress(OSError):  # Windows keeps the locked file until filelock releases it
                    path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
