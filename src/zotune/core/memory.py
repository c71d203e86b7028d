"""Host-memory housekeeping: give the C heap's freed pages back to the OS; measure a phase's peak memory.

glibc keeps freed blocks in its heap (and raises its mmap threshold each time a large mmapped block is freed, so
later large blocks come from the heap too). A step that allocates many differently sized large blocks in turn, such
as a Bilevel ZOFO step (first-order passes, then six forwards), so grows its resident set well past the tensors it
holds at once: 1.25 × a first-order LoRA step's peak RSS on SmolLM2-135M, 1.02 × when the heap is trimmed before
each forward (``benchmarks/results/cpu-smollm2-b16x64-zofo-memory.json``). On CUDA the caching allocator reuses its
blocks and none of this applies.

Example::

    >>> import torch
    >>> from zotune.core.memory import release_freed_memory
    >>> blocks = [torch.ones(16_000) for _ in range(1_000)]  # 64 kB each: heap blocks, not mmapped
    >>> pin, blocks = torch.ones(16_000), None  # freed below a live block: glibc's own trim cannot reach them
    >>> release_freed_memory()  # on glibc; False elsewhere
    True

A phase's peak (CPU: the kernel's resident high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs``;
CUDA: ``max_memory_allocated``, reset by ``reset_peak_memory_stats``)::

    >>> from zotune.core.memory import peak_memory_bytes, reset_peak_memory
    >>> reset_peak_memory(torch.device("cpu"))
    True
    >>> x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    >>> peak_memory_bytes(torch.device("cpu")) >= 64 * 2**20
    True
"""

from __future__ import annotations

import ctypes
import functools
import gc
import resource

import torch


@functools.cache
def _malloc_trim():  # glibc's malloc_trim, or None on another C library
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: return the free pages of every glibc arena to the OS (their contents are not used again,
    so nothing changes but the resident set). Costs ~0.08 s on a heap of a few GiB. Returns whether memory
    was released (False: nothing to release, or not glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory phase on ``device``: collect garbage, return freed heap pages, reset the high-water
    mark. Returns False where the CPU mark cannot be reset (not Linux ≥ 4.0, or ``clear_refs`` not writable): the
    peak read after it is then the process's lifetime peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    release_freed_memory()  # so the new mark starts from the memory really in use
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last :func:`reset_peak_memory` (or since the process began): CUDA
    ``max_memory_allocated``, else the peak resident set (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resident_memory_bytes() -> int:
    """The process's resident set now (``VmRSS``), in bytes; 0 where /proc is missing."""
    return _status_bytes("VmRSS") or 0


def _status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
