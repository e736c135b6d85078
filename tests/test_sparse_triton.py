"""The Triton kernel against the reference, run by Triton's interpreter on CPU tensors."""

import importlib
import os

import pytest
import torch

from tests.helpers import random_qkv

from fastctx.kernels import lserve as ls
from fastctx.kernels.sparse import (
    dense_index,
    reference_sparse_prefill_attention,
    streaming_index,
    vertical_slash_index,
)


def _import_kernel():
    """Import the kernel module interpreted on CPU-only machines, without leaking
    TRITON_INTERPRET into the rest of the session (engines must not see it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("fastctx.kernels.sparse_triton")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


triton_kernel = _import_kernel()


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    # Triton also reads the variable while it runs an interpreted kernel.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _vs(heads, q_len, prefix, block_q):
    g = torch.Generator().manual_seed(1)
    total = prefix + q_len
    vertical = torch.cat([torch.arange(3).expand(heads, -1), torch.randint(0, total, (heads, 7), generator=g)], 1)
    slash = torch.cat([torch.arange(4).expand(heads, -1), torch.randint(0, total, (heads, 5), generator=g)], 1)
    return vertical_slash_index(vertical, slash, q_len, prefix, block_q)


@pytest.mark.parametrize("kind", ["dense", "streaming", "vertical_slash"])
@pytest.mark.parametrize("heads,kv_heads,q_len,prefix,block_q", [
    (4, 2, 40, 0, 16), (3, 3, 70, 30, 32), (2, 1, 33, 17, 16)])
def test_triton_matches_reference(kind, heads, kv_heads, q_len, prefix, block_q):
    q, k, v, kp, vp = random_qkv(heads, kv_heads, q_len, prefix, 64)
    index = {"dense": lambda: dense_index(heads, q_len, prefix, block_q),
             "streaming": lambda: streaming_index(heads, q_len, 2, 12, prefix, block_q),
             "vertical_slash": lambda: _vs(heads, q_len, prefix, block_q)}[kind]()
    got = triton_kernel.sparse_prefill_attention_triton(q, k, v, kp, vp, index=index, block_n=16)
    want = reference_sparse_prefill_attention(q, k, v, kp, vp, index=index)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision_and_head_dim_128(dtype, tol):
    q, k, v, kp, vp = random_qkv(2, 1, 32, 16, 128, dtype)
    index = _vs(2, 32, 16, 16)
    got = triton_kernel.sparse_prefill_attention_triton(q, k, v, kp, vp, index=index, block_n=16)
    want = reference_sparse_prefill_attention(q, k, v, kp, vp, index=index)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_triton_decode_over_pages():
    context = 200
    q, k, v = torch.randn(4, 1, 64), torch.randn(2, context, 64), torch.randn(2, context, 64)
    sel = ls.select_pages(q[:, 0], *ls.page_summaries(k), ls.LServeParams(token_budget=64))
    index = ls.page_index(sel, context)
    args = (q, k[:, -1:], v[:, -1:], k[:, :-1], v[:, :-1])
    torch.testing.assert_close(triton_kernel.sparse_prefill_attention_triton(*args, index=index, block_n=16),
                               reference_sparse_prefill_attention(*args, index=index), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads,q_len,prefix,last_q,dtype", [
    (4, 2, 40, 0, 64, torch.float32), (3, 3, 70, 30, 32, torch.float32), (2, 1, 20, 45, 16, torch.float16)])
def test_triton_last_query_sums_match_reference(heads, kv_heads, q_len, prefix, last_q, dtype):
    from fastctx.kernels.minference import reference_last_query_sums

    q, k, _, kp, _ = random_qkv(heads, kv_heads, q_len, prefix, 64, dtype)
    k = torch.cat([kp, k], 1)
    got = triton_kernel.last_query_sums_triton(q, k, prefix, last_q, 0.2, block_n=16)
    want = reference_last_query_sums(q, k, prefix, last_q, 0.2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
