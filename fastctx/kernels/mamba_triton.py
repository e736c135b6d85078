"""Triton GPU kernel for the Mamba-1 selective scan of one sequence.

One program per block of channels: it walks the tokens in order with the
block's ``[channels, state]`` in registers (float32), as the CPU kernel does.
Tests run it under ``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan(x_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, state_ptr, y_ptr, T, CH, N,
          BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    ch_ok, n_ok = ch < CH, n < N
    both = ch_ok[:, None] & n_ok[None, :]
    a = tl.load(a_ptr + ch[:, None] * N + n[None, :], mask=both, other=0.0)
    h = tl.load(state_ptr + ch[:, None] * N + n[None, :], mask=both, other=0.0)
    d = tl.load(d_ptr + ch, mask=ch_ok, other=0.0)
    for t in range(0, T):
        x = tl.load(x_ptr + t * CH + ch, mask=ch_ok, other=0.0)
        dt = tl.load(delta_ptr + t * CH + ch, mask=ch_ok, other=0.0)
        b = tl.load(b_ptr + t * N + n, mask=n_ok, other=0.0)
        c = tl.load(c_ptr + t * N + n, mask=n_ok, other=0.0)
        h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * b[None, :]
        tl.store(y_ptr + t * CH + ch, tl.sum(h * c[None, :], 1) + d * x, mask=ch_ok)
    tl.store(state_ptr + ch[:, None] * N + n[None, :], h, mask=both)


def selective_scan_triton(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Same contract as the CPU kernel: contiguous float32 inputs, ``state`` updated in place, returns y."""
    T, channels = x.shape
    n = A.shape[1]
    y = torch.empty_like(x)
    block_c = 32
    _scan[(triton.cdiv(channels, block_c),)](x, delta, A, B, C, D, state, y, T, channels, n,
                                              BLOCK_C=block_c, BLOCK_N=triton.next_power_of_2(n))
    return y
