"""zotune.core.memory: the heap trim returns freed pages to the OS (glibc, Linux) and changes nothing else."""

from __future__ import annotations

import platform

import pytest
import torch

from zotune.core.memory import release_freed_memory


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_pages_go_back_to_the_os():
    """Blocks under the mmap threshold live in the heap; freed in its middle (the last block pins the top, so glibc's
    own trim on free cannot reach them) they stay resident until ``malloc_trim``."""
    blocks = [torch.ones(16_000) for _ in range(4_000)]  # 64 kB each, 256 MB in all, pages touched
    pin = torch.ones(16_000)
    del blocks
    before = rss()
    assert release_freed_memory() is True
    after = rss()
    assert before - after > 100 * 2**20, (before, after)
    assert torch.equal(pin, torch.ones(16_000))  # live memory is untouched


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/status")
def test_resident_set_and_its_peak_follow_a_touched_allocation():
    from zotune.core.memory import peak_memory_bytes, reset_peak_memory, resident_memory_bytes

    cpu = torch.device("cpu")
    assert resident_memory_bytes() == rss()
    assert reset_peak_memory(cpu) is True
    start = peak_memory_bytes(cpu)
    block = torch.ones(50 * 2**20 // 4)  # 50 MiB, every page written
    assert resident_memory_bytes() - rss() < 2**20 and peak_memory_bytes(cpu) - start > 45 * 2**20
    del block
    release_freed_memory()
    assert reset_peak_memory(cpu) and peak_memory_bytes(cpu) - start < 20 * 2**20  # the reset forgets the block
