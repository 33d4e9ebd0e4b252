"""Paged KV cache: fixed-size blocks (reference counted, with prefix caching) and the per-layer
cache tensors.
Legend: NB blocks, BS block size, G kv heads (local to the TP rank), Hd head dim."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

import torch


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockAllocator:
    """Hands out block ids; a request holds ``ceil(tokens / BS)`` of them.

    Prefix caching (vLLM's automatic prefix caching): a full block whose tokens are known is
    registered under the hash of its tokens chained with its predecessor's (so a hash names the
    whole prefix up to that block). Blocks are reference counted; a registered block that no
    request holds stays cached (evictable, least recently freed first) until its memory is
    needed. ``num_free`` counts evictable blocks as free."""

    def __init__(self, num_blocks: int, caching: bool = False):
        self.num_blocks, self.caching = num_blocks, caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # registered block -> its prefix hash
        self._cached: dict[bytes, int] = {}  # prefix hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by nobody (LRU first)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:  # reuse the least recently used cached block: forget its contents
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def free(self, block_ids: list[int]) -> None:
        for block in block_ids:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Take a reference on the cached blocks of the longest prefix of ``hashes``."""
        hit = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            hit.append(block)
        return hit

    def register(self, block: int, h: bytes) -> None:
        """A held block now holds the full prefix ``h``; a second block with the same prefix
        stays private (the first one is the one shared)."""
        if self.caching and h not in self._cached and block not in self._hash_of:
            self._cached[h], self._hash_of[block] = block, h


def prefix_hashes(token_ids: list[int], block_size: int, done: list[bytes] = ()) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids``; ``done``: the first ones, already
    computed (kept). SHA-256: two prefixes that collide would share wrong KV."""
    out = list(done)
    for b in range(len(out), len(token_ids) // block_size):
        block = token_ids[b * block_size:(b + 1) * block_size]
        out.append(hashlib.sha256((out[-1] if out else b"") + array("q", block).tobytes()).digest())
    return out


def kv_bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: str | torch.device
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k, v) per layer, each [NB, BS, G, Hd]."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]
