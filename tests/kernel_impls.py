"""Implementations of each kernel op under test, and the tolerances they are held to (one place).

Triton kernels run natively where a GPU is present (``benchmarks/gpu/check.sh``) and under
Triton's CPU interpreter elsewhere, without leaking TRITON_INTERPRET into the rest of the session
(engines must not see it).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from fastctx.kernels.paged import PagedKV

# Max abs/rel error against the float32 reference, per input dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@contextlib.contextmanager
def _interpreted():
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreted():  # TRITON_INTERPRET=1 at import time makes @triton.jit build interpreted functions
    sparse_triton = importlib.import_module("fastctx.kernels.sparse_triton")
    mamba_triton = importlib.import_module("fastctx.kernels.mamba_triton")
    paged_triton = importlib.import_module("fastctx.kernels.paged_triton")


def run_triton(fn, *args, **kwargs):
    """Call a Triton entry point on the test's CPU tensors: natively on a GPU when there is one (tensors
    moved there and back, arguments the kernel updated in place included), else under the interpreter
    (Triton also reads the variable while an interpreted kernel runs)."""
    if not torch.cuda.is_available():
        with _interpreted():
            return fn(*args, **kwargs)
    moved = [_to_cuda(a) for a in args]
    result = fn(*moved, **{k: _to_cuda(v) for k, v in kwargs.items()})
    for original, copy in zip(args, moved):
        if isinstance(original, torch.Tensor):
            original.copy_(copy)
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


def _to_cuda(a):
    if isinstance(a, PagedKV):
        return PagedKV(a.key.cuda(), a.value.cuda())
    return a.cuda() if isinstance(a, torch.Tensor) else a


def triton_paged_attention(query, kv, table, query_start, seq_lens, reads, *, scale):
    """The Triton batch kernel under ``paged_attention``'s test signature."""
    out = torch.zeros_like(query)
    return paged_triton.paged_attention_triton(query, kv, table, query_start, seq_lens, reads, scale=scale,
                                               out=out)


def paged_copy(seqs: list[tuple[torch.Tensor, torch.Tensor]], layout: str, block_size: int, seed: int = 0):
    """The sequences' K/V (each ``[Hkv, T, D]``) written into a paged cache in ``layout``, in scattered
    blocks as an engine's block table hands them out: ``(PagedKV, block_table [B, M] int32)``.

    layouts: ``vllm_cpu`` (vLLM's CPU cache: K dims-major inside a (block, head) region, V after
    it), ``token_major`` (CUDA-style ``[blocks, block_size, kv_heads, D]``), ``head_major``
    (``[blocks, kv_heads, block_size, D]``, plain)."""
    kv_heads, _, dim = seqs[0][0].shape
    dtype = seqs[0][0].dtype
    need = [-(-k.shape[1] // block_size) for k, _ in seqs]
    total = sum(need) + 3
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=g)
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    if layout == "vllm_cpu":
        raw = torch.randn(total, kv_heads, block_size, 2 * dim, generator=g).to(dtype)
        sb, sh = raw.stride(0), raw.stride(1)
        key = raw.as_strided((total, kv_heads, block_size, dim), (sb, sh, 1, block_size))
        value = raw.as_strided((total, kv_heads, block_size, dim), (sb, sh, dim, 1), block_size * dim)
    elif layout == "token_major":
        raw = torch.randn(2, total, block_size, kv_heads, dim, generator=g).to(dtype)
        key, value = raw[0].permute(0, 2, 1, 3), raw[1].permute(0, 2, 1, 3)
    else:
        key = torch.randn(total, kv_heads, block_size, dim, generator=g).to(dtype)
        value = torch.randn(total, kv_heads, block_size, dim, generator=g).to(dtype)
    at = 0
    for b, (k, v) in enumerate(seqs):
        for i in range(need[b]):
            blk = int(order[at])
            at += 1
            table[b, i] = blk
            part = slice(i * block_size, min((i + 1) * block_size, k.shape[1]))
            n = part.stop - part.start
            key[blk, :, :n] = k[:, part]
            value[blk, :, :n] = v[:, part]
    return PagedKV(key, value), table
