"""RMSNorm, rotary embedding and linear layers, matching Hugging Face's reference math.
Legend: T tokens, D hidden, H heads, Hd head dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as a device tensor without waiting for the GPU: on CUDA through pinned
    memory and an asynchronous copy (a plain ``torch.tensor(..., device=cuda)`` synchronises)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (HF's order of operations)."""
    if x_TD.is_cuda:  # one launch instead of five on the GPU
        from afdserve.kernels.norm import rms_norm_gpu  # Triton: imported only on GPU
        return rms_norm_gpu(x_TD, weight_D, eps)
    x = x_TD.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x.to(x_TD.dtype)


def add_rms_norm(x_TD: torch.Tensor, a_TD: torch.Tensor, weight_D: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + a), x + a): the residual add and the next norm, one launch on the GPU."""
    if x_TD.is_cuda:
        from afdserve.kernels.norm import add_rms_norm_gpu  # Triton: imported only on GPU
        return add_rms_norm_gpu(x_TD, a_TD, weight_D, eps)
    s_TD = x_TD + a_TD
    return rms_norm(s_TD, weight_D, eps), s_TD


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def rope_cos_sin(positions_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, Hd] for plain (NeoX-style, rotate-half) RoPE, in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions_T.device).float() / head_dim))
    freqs_TR = positions_T.float()[:, None] * inv_freq[None, :]
    emb_THd = torch.cat((freqs_TR, freqs_TR), dim=-1)
    return emb_THd.cos(), emb_THd.sin()


def apply_rope(x_THHd: torch.Tensor, cos_THd: torch.Tensor, sin_THd: torch.Tensor) -> torch.Tensor:
    """Rotate q or k [T, H, Hd] by position; computed in float32 like HF, cast back."""
    cos, sin = cos_THd[:, None, :], sin_THd[:, None, :]
    x = x_THHd
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x_THHd.dtype)
