"""Host-memory housekeeping: give the C heap's freed pages back to the OS.

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
"""

from __future__ import annotations

import ctypes
import functools


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
