"""Batch sizes of the CUDA graphs: the buckets and --cuda-graph-sizes (CPU: only the sizes;
the graphs themselves are tested on GPU)."""

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


def test_capture_sizes_follow_vllm_cuda_graph_sizes(tiny_models):
    """None: the ladder up to the largest decode batch (max_num_seqs within the token budget);
    one value N: the ladder up to N; several: exactly those (the ones that can occur)."""
    from afdserve.config import ConfigError, make_config
    from afdserve.cuda_graphs import capture_sizes

    model = tiny_models["mixtral"]
    assert capture_sizes(make_config(model, max_num_seqs=300, max_num_batched_tokens=100)) == buckets(100)
    assert capture_sizes(make_config(model, max_num_seqs=64, cuda_graph_sizes=[16])) == [1, 2, 4, 8, 16]
    assert capture_sizes(make_config(model, max_num_seqs=64, cuda_graph_sizes=[48, 1, 100, 8])) == [1, 8, 48]
    with pytest.raises(ConfigError, match="none is at most the largest decode batch, 64"):
        capture_sizes(make_config(model, max_num_seqs=64, cuda_graph_sizes=[100, 200]))
    with pytest.raises(ConfigError, match="cuda_graph_sizes must be positive integers"):
        make_config(model, cuda_graph_sizes=[0, 4])


def test_cli_flag_reaches_the_config(tiny_models):
    import argparse

    from afdserve.__main__ import add_engine_args, engine_kwargs
    from afdserve.config import make_config

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kwargs = engine_kwargs(p.parse_args(["--cuda-graph-sizes", "1", "8", "32"]))
    assert make_config(tiny_models["mixtral"], **kwargs).scheduler.cuda_graph_sizes == (1, 8, 32)
