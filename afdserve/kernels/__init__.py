"""GPU fast paths (Triton + torch) of the hot functions in ``afdserve/layers``.

Each kernel computes the same function as the plain-torch CPU function it replaces; the
layers call it behind ``if x.is_cuda:``. The submodules import Triton at module level, so
import them only where tensors are on CUDA: this package itself imports on a CPU machine
without Triton.

- ``router``: softmax + top-k + renormalisation + per-expert counts in one kernel.
- ``dispatch``: expert-sorted row placement of (token, k) pairs; ids < 0 are skipped.
- ``experts``: the expert FFN as grouped GEMMs (``torch._grouped_mm`` or ``moe_gemm``).
- ``attention``: paged decode attention (split-KV), varlen causal prefill, KV writes.
"""
