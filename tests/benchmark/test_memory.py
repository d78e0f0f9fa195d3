"""``sspo bench``'s CPU memory measure: anonymous memory, not file pages the kernel may drop."""

import mmap
import time

import torch

from sspo.benchmark.memory import Meter


def test_cpu_memory_counts_an_allocation_and_not_dropped_file_pages(tmp_path):
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"\1" * (100 * 2**20))
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE)) == len(mapped) // mmap.PAGESIZE  # its pages resident
    meter = Meter(torch.device("cpu"))
    assert "anonymous" in meter.method
    meter.reset()
    mapped.close()  # 100 MB of file pages leave the resident set inside the region
    held = torch.ones(50 * 2**20)  # 200 MB, written, so resident
    time.sleep(0.05)
    peak = meter.peak_mb()["peak_mb"]
    del held
    assert 190 <= peak < 260
