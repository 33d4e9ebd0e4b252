"""Paged KV cache: a free list of fixed-size blocks and the per-layer cache tensors.
Legend: NB blocks, BS block size, G kv heads (local to the TP rank), Hd head dim."""

from __future__ import annotations

from collections import deque

import torch


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockAllocator:
    """Hands out block ids; a request holds ``ceil(tokens / BS)`` of them."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


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
