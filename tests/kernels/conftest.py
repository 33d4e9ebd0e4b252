"""The ``dev`` fixture of the GPU kernel tests: (device, dtype), or a skip (see gpu_check)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.gpu_check import backend


@pytest.fixture
def dev() -> tuple[str, torch.dtype]:
    found = backend()
    if found is None:
        pytest.skip("needs CUDA and Triton (or TRITON_INTERPRET=1 with Triton)")
    return found
