"""Explicit, reproducible randomness for ZO directions.

A direction z is never stored. For each tensor it is regenerated from a 63-bit seed derived from
(run seed, step, direction) and the tensor's *name*, so z for a tensor does not depend on which other tensors are in
the space, nor on their order. Large tensors are cut into fixed blocks of ``BLOCK`` elements, each drawn from its own
``torch.Generator`` seeded from (tensor seed, block index): the blocks can then be generated on several threads and
the result does not depend on the thread count. Library code never touches the global RNG.

Example:
    >>> from zotune.core.rng import derive_seed, tensor_seed
    >>> s = derive_seed(0, 12, 0)           # run seed 0, step 12, direction 0
    >>> tensor_seed(s, "lm_head.weight") == tensor_seed(s, "lm_head.weight")
    True
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

BLOCK = 1 << 20  # elements per generator block (4 MiB of fp32): bounds the z buffer, fixes z for any thread count
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele et al. 2014): a cheap, well-mixed 64-bit bijection."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints and strings (blake2b, so stable across processes and Python versions)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & _MASK63


@lru_cache(maxsize=65536)
def name_key(name: str) -> int:
    """Stable 64-bit key of a tensor name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def tensor_seed(direction_seed: int, name: str) -> int:
    """Seed of z for one tensor in one direction: depends on the direction seed and the tensor name only."""
    return _splitmix64(direction_seed ^ name_key(name)) & _MASK63


def block_seed(tseed: int, block: int) -> int:
    """Seed of block ``block`` (elements [block*BLOCK, (block+1)*BLOCK)) of a tensor's z."""
    return _splitmix64(tseed ^ _splitmix64(block)) & _MASK63
