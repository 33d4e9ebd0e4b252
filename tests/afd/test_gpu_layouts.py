"""The multi-process layouts on GPUs (NCCL for tensors, Gloo for the per-step flags): the AFD
pipeline and the colocated exchange give the single-process engine's greedy tokens on CUDA.
Needs two GPUs; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LAYOUTS = {  # name: options (two GPUs, one process each); ipc: the shared-slot transport (CUDA IPC)
    "afd_m1_ipc": dict(layout="afd", attn_groups=1, expert_groups=1, micro_batches=1, afd_transport="ipc"),
    "afd_m3_ipc": dict(layout="afd", attn_groups=1, expert_groups=1, micro_batches=3, afd_transport="ipc"),
    "afd_m1_p2p": dict(layout="afd", attn_groups=1, expert_groups=1, micro_batches=1, afd_transport="p2p"),
    "afd_m3_p2p": dict(layout="afd", attn_groups=1, expert_groups=1, micro_batches=3, afd_transport="p2p"),
    "afd_m2_auto": dict(layout="afd", attn_groups=1, expert_groups=1, micro_batches=2),  # picks ipc (P2P checked)
    "colocated_2": dict(layout="colocated", attn_groups=2),
}


@pytest.fixture(scope="module")
def gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 7, 33, 20, 64)]


def _generate(model: str, **options) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(model, device="cuda", dtype="float32", max_num_batched_tokens=48, enforce_eager=True, **options) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(_prompts(), params)]


@pytest.fixture(scope="module")
def reference(gpus, tiny_models) -> list[list[int]]:
    return _generate(tiny_models["mixtral"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_on_gpu(tiny_models, reference, name):
    assert _generate(tiny_models["mixtral"], **LAYOUTS[name]) == reference


def test_empty_micro_batches_on_gpu(gpus, tiny_models, reference):
    """One request, three micro-batches, two replicas: empty micro-batches and an idle replica
    run every kernel with zero tokens."""
    model = tiny_models["mixtral"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for options in (LAYOUTS["afd_m3_ipc"], LAYOUTS["afd_m3_p2p"], LAYOUTS["colocated_2"]):
        with LLM(model, device="cuda", dtype="float32", enforce_eager=True, **options) as llm:
            assert llm.generate([_prompts()[2]], params)[0].outputs[0].token_ids == reference[2]
