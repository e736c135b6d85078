"""The Mamba-1 ops: the scan's reference against the recurrence written out, its C++ and Triton kernels
against the reference, and whole / chunked / step-by-step conv and scan agreeing. Needs only torch,
Triton and pytest, so ``benchmarks/gpu/check.sh`` runs it on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastctx.kernels.mamba import (
    causal_conv1d,
    causal_conv1d_step,
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)
from tests.kernel_impls import mamba_triton, run_triton  # at collection: Triton modules load interpreted on CPU


def _naive_scan(x, delta, A, B, C, D):
    """Element by element, straight from the Mamba paper."""
    T, channels = x.shape
    h = torch.zeros(channels, A.shape[1], dtype=torch.float64)
    y = torch.zeros(T, channels, dtype=torch.float64)
    for t in range(T):
        for c in range(channels):
            for n in range(A.shape[1]):
                h[c, n] = math.exp(delta[t, c] * A[c, n]) * h[c, n] + delta[t, c] * B[t, n] * x[t, c]
            y[t, c] = sum(h[c, n] * C[t, n] for n in range(A.shape[1])) + D[c] * x[t, c]
    return y


def _scan_inputs(T=9, channels=5, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, channels, generator=g)
    delta = F.softplus(torch.randn(T, channels, generator=g))
    A = -torch.rand(channels, n, generator=g) - 0.1
    B, C, D = torch.randn(T, n, generator=g), torch.randn(T, n, generator=g), torch.randn(channels, generator=g)
    return x, delta, A, B, C, D


@pytest.mark.parametrize("chunk", [256, 4])  # the default, and buffers smaller than the sequence
def test_selective_scan_reference_matches_the_recurrence_written_out(monkeypatch, chunk):
    monkeypatch.setattr("fastctx.kernels.mamba.SCAN_CHUNK", chunk)
    args = _scan_inputs()
    y, _ = selective_scan_reference(*args)
    torch.testing.assert_close(y.double(), _naive_scan(*[a.double() for a in args]), atol=1e-5, rtol=1e-5)


def _scan_cpp(x, delta, A, B, C, D, state):
    return selective_scan(x, delta, A, B, C, D, state)  # CPU tensors: the C++ kernel


def _scan_triton(x, delta, A, B, C, D, state):
    h = (torch.zeros(A.shape) if state is None else state.float().clone()).contiguous()
    args = [t.float().contiguous() for t in (x, delta, A, B, C, D)]
    return run_triton(mamba_triton.selective_scan_triton, *args, h).to(x.dtype), h


@pytest.mark.parametrize("impl", [_scan_cpp, _scan_triton], ids=["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, channels, n, with_state", [(1, 5, 4, True), (37, 70, 16, False), (300, 33, 16, True),
                                                        (9, 130, 3, True)])
def test_selective_scan_kernels_match_the_reference(impl, dtype, T, channels, n, with_state):
    x, delta, A, B, C, D = _scan_inputs(T=T, channels=channels, n=n, seed=T)
    x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
    state = torch.randn(channels, n) if with_state else None
    before = None if state is None else state.clone()
    want_y, want_h = selective_scan_reference(x, delta, A, B, C, D, state)
    y, h = impl(x, delta, A, B, C, D, state)
    assert y.dtype == dtype and h.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), want_y.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)
    if state is not None:
        assert torch.equal(state, before)  # the caller's state is left as it was


def test_scan_in_chunks_and_steps_equals_the_whole_sequence():
    x, delta, A, B, C, D = _scan_inputs(T=12)
    whole, final = selective_scan(x, delta, A, B, C, D)
    y1, h = selective_scan(x[:5], delta[:5], A, B[:5], C[:5], D)
    y2, h = selective_scan(x[5:9], delta[5:9], A, B[5:9], C[5:9], D, h)
    steps = []
    for t in range(9, 12):  # decode: one token per call, batched over a single sequence
        y, h = selective_scan_step(x[t:t + 1], delta[t:t + 1], A, B[t:t + 1], C[t:t + 1], D, h.unsqueeze(0))
        h = h[0]
        steps.append(y)
    torch.testing.assert_close(torch.cat([y1, y2, *steps]), whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h, final, atol=1e-6, rtol=1e-5)


def test_causal_conv_matches_torch_conv_and_carries_state():
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(10, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    conv.weight.data, conv.bias.data = weight.unsqueeze(1), bias
    want = F.silu(conv(x.t().unsqueeze(0))[0, :, :10].t())
    whole, state = causal_conv1d(x, weight, bias)
    torch.testing.assert_close(whole, want.detach())
    a, s = causal_conv1d(x[:3], weight, bias)
    b, s = causal_conv1d(x[3:8], weight, bias, s)
    outs = [a, b]
    for t in range(8, 10):
        y, s1 = causal_conv1d_step(x[t:t + 1], weight, bias, s.unsqueeze(0))
        s = s1[0]
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs), whole)
    torch.testing.assert_close(s, state)
