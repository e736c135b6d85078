"""Mamba-1 sequence ops for one sequence at a time: the depthwise causal conv and the selective scan.

Both take an optional carried state and return the new one, so a prompt can be
processed whole, in chunks, or one token at a time (decode) with the same
result. Tensors are token-major: ``x`` is ``[tokens, channels]``. The scan runs
in float32 whatever the input dtype, as the reference CUDA kernel does.

``selective_scan`` dispatches to a C++ kernel on CPU and a Triton kernel on
CUDA, both checked against ``selective_scan_reference``; the conv and the
one-token steps are a few tensor ops each and stay in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCAN_CHUNK = 256


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over ``x [T, C]`` with ``weight [C, K]``, then SiLU.

    ``state [C, K-1]`` holds the previous K-1 inputs (zeros for a new sequence); the returned
    state holds the last K-1 inputs after ``x``."""
    channels, width = weight.shape
    if state is None:
        state = x.new_zeros(channels, width - 1)
    padded = torch.cat([state.to(x.dtype), x.t()], dim=1)  # [C, K-1+T]
    out = F.conv1d(padded.unsqueeze(0), weight.unsqueeze(1).to(x.dtype),
                   None if bias is None else bias.to(x.dtype), groups=channels)[0]
    return F.silu(out.t().contiguous()), padded[:, padded.shape[1] - (width - 1):].clone()


def selective_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan (contract of ``selective_scan_reference``) on the C++ kernel for CPU tensors, the Triton
    kernel for CUDA tensors, the reference elsewhere. Inputs are taken in float32."""
    if x.device.type not in ("cpu", "cuda"):
        return selective_scan_reference(x, delta, A, B, C, D, state)
    h = (torch.zeros(A.shape, device=x.device) if state is None else state.float().clone()).contiguous()
    args = [t.float().contiguous() for t in (x, delta, A, B, C, D)]
    if x.device.type == "cpu":
        from fastctx.kernels._cpu_ext import cpu_ops

        y = cpu_ops().selective_scan(*args, h)
    else:
        from fastctx.kernels.mamba_triton import selective_scan_triton

        y = selective_scan_triton(*args, h)
    return y.to(x.dtype), h


def selective_scan_reference(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor,
                             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 recurrence ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = h_t C_t + D x_t``.

    ``x, delta [T, C]`` (delta after softplus), ``A [C, N]`` (negative), ``B, C [T, N]`` shared by all
    channels, ``D [C]``, ``state [C, N]`` (zeros for a new sequence). Returns ``y [T, C]`` in x's dtype
    and the final state in float32."""
    xf, df = x.float(), delta.float()
    Af, Bf, Cf = A.float(), B.float(), C.float()
    h = xf.new_zeros(A.shape) if state is None else state.float().clone()
    ys = torch.empty_like(xf)
    for start in range(0, x.shape[0], SCAN_CHUNK):  # bounds the [tokens, C, N] buffers
        end = min(start + SCAN_CHUNK, x.shape[0])
        decay = torch.exp(df[start:end].unsqueeze(-1) * Af)  # [t, C, N]
        hs = (df[start:end] * xf[start:end]).unsqueeze(-1) * Bf[start:end].unsqueeze(1)  # inputs, then states
        for t in range(end - start):
            h = torch.addcmul(hs[t], decay[t], h, out=hs[t])
        ys[start:end] = (hs @ Cf[start:end].unsqueeze(-1)).squeeze(-1)
    return (ys + xf * D.float()).to(x.dtype), h.clone()


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence (decode): ``x [S, C]``, ``state [S, C, K-1]`` -> SiLU output, new state."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [S, C, K]
    out = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out), window[..., 1:]


def selective_scan_step(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence (decode): ``x, delta [S, C]``, ``B, C [S, N]``, ``state [S, C, N]``."""
    xf, df = x.float(), delta.float()
    h = torch.exp(df.unsqueeze(-1) * A.float()) * state.float() + (df * xf).unsqueeze(-1) * B.float().unsqueeze(1)
    y = (h @ C.float().unsqueeze(-1)).squeeze(-1) + xf * D.float()
    return y.to(x.dtype), h
