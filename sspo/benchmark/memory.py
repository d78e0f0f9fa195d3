"""Peak memory of a timed region: the CUDA allocator's peak on a GPU, anonymous resident memory on the CPU.

On the CPU the peak is that of *anonymous* resident memory (``RssAnon``: resident pages minus
file-backed and shared ones, read from ``/proc/self/statm`` by a background thread every 1 ms and at
the region's ends) minus the same before the trainer was built, i.e. model weights, optimizer state,
data and activations, not the Python / torch libraries. File-backed pages are left out because the
kernel may evict them under memory pressure, which would lower a total-RSS peak below its baseline.
The sampler's own CPU time is left out of the CPU clock.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _anon_bytes() -> int | None:
    """Anonymous resident memory (the kernel's RssAnon): resident minus file-backed and shared pages,
    read from ``/proc/self/statm`` (a few microseconds); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * _PAGE


def malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class AnonPeak:
    """The peak of anonymous resident memory over a region, sampled by a background thread.

    Anonymous pages are what the process allocates (tensors, heap); file-backed pages (mapped
    libraries and weights, page cache) are left out, so the kernel evicting them under memory
    pressure cannot lower the result. The thread reads ``/proc/self/statm`` every ``interval`` s
    (torch releases the GIL in its kernels), and at the region's start and end; an allocation freed
    within one interval can be missed. Its own CPU time is kept in ``cpu_s`` so a CPU clock can
    leave it out.
    """

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self.cpu_s = interval, 0, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop()
        self.peak = _anon_bytes() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="sspo-bench-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        spent_before = self.cpu_s
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _anon_bytes() or 0)
            self.cpu_s = spent_before + time.thread_time()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, _anon_bytes() or 0)
        return self.peak


class Meter:
    """Peak memory of a region: CUDA allocator peak on a GPU, peak anonymous memory on the CPU (see module doc)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sampler = None if self.cuda or _anon_bytes() is None else AnonPeak()
        if not self.cuda:
            # The same clean-up as reset(): an earlier arm's garbage (in-process runs) freed after the
            # baseline was read would make the peak above it too small, even negative.
            gc.collect()
            malloc_trim()
        self.baseline = 0 if self.sampler is None else _anon_bytes()
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated"
        elif self.sampler is not None:
            self.method = (f"peak anonymous RSS (RssAnon from /proc/self/statm, sampled every {self.sampler.interval * 1e3:g} ms "
                           "and at the region's ends) - anonymous RSS before the trainer")
        else:
            self.method = "ru_maxrss (process lifetime peak RSS: no /proc/self/statm)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def process_time(self) -> float:
        """This process's CPU time, less what the memory sampler spent."""
        return time.process_time() - (self.sampler.cpu_s if self.sampler is not None else 0.0)

    def reset(self) -> None:
        self.sync()
        gc.collect()
        malloc_trim()  # freed heap memory back to the OS, so an earlier phase does not count here
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.sampler is not None:
            self.sampler.start()

    def peak_mb(self) -> dict:
        self.sync()
        if self.cuda:
            return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
        if self.sampler is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
            return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
        peak = self.sampler.stop()
        return {"peak_mb": (peak - self.baseline) / 2**20, "peak_anon_mb": peak / 2**20}
