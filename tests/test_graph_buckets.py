"""Batch-size buckets of the CUDA graphs (CPU: only the sizes; the graphs are tested on GPU)."""

from __future__ import annotations

import pytest

from afdserve.cuda_graphs import bucket_of, buckets


@pytest.mark.parametrize("max_batch", [1, 3, 8, 64, 256, 700, 1376, 4096])
def test_buckets_cover_every_batch_with_bounded_padding(max_batch):
    sizes = buckets(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
    for n in range(1, max_batch + 1):
        b = bucket_of(n, sizes)
        assert b >= n
        assert b - n <= max(7, n // 4)  # padding: at most 7 rows or a quarter of the batch
    assert bucket_of(max_batch + 1, sizes) is None
