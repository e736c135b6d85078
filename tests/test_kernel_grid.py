"""Every kernel op against its PyTorch reference: one grid per op, over its implementations.

Implementations: ``cpp`` (the C++ CPU kernel; ``cpp-paged`` reads the same K/V
from a scattered paged cache), ``triton`` (under Triton's interpreter on CPU),
``sdpa`` (torch). Tolerances live in ``tests/kernel_impls.TOL``.
"""

from __future__ import annotations

import pytest
import torch

from fastctx.kernels import prefill_attention, reference_prefill_attention
from fastctx.kernels.attention import Read, paged_attention, reference_paged_attention
from fastctx.kernels.estimation import last_query_sums, pool_blocks, pooled_keys, reference_last_query_sums
from fastctx.kernels.paged import SeqKV
from fastctx.kernels.sparse import (
    dense_index,
    reference_sparse_prefill_attention,
    sparse_prefill_attention,
    streaming_index,
)
from tests.helpers import INDEXES, random_qkv, random_vs_index
from tests.kernel_impls import TOL, paged_copy, run_triton, sparse_triton, triton_paged_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GQA = {"gqa9x3": (9, 3), "mha4": (4, 4), "mqa8": (8, 1)}
CHUNKS = {"decode": (1, 70), "first-token": (1, 0), "short": (7, 0), "fresh": (150, 0), "after-prefix": (97, 130)}


def _close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])





# ---------------------------------------------------------------- prefill_attention (dense, SDPA)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads,kv_heads", GQA.values(), ids=GQA.keys())
@pytest.mark.parametrize("q_len,prefix", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("dim", [64, 128], ids=["d64", "d128"])
def test_dense_prefill_sdpa(dtype, heads, kv_heads, q_len, prefix, dim):
    q, k, v, kp, vp = random_qkv(heads, kv_heads, q_len, prefix, dim, dtype)
    got = prefill_attention(q, k, v, kp, vp, scale=dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    _close(got, reference_prefill_attention(q, k, v, kp, vp, scale=dim ** -0.5), dtype)


# ---------------------------------------------------------------- sparse_prefill_attention (one sequence)

def _sgemm_path(fn):
    """The C++ kernel's sgemm path, which hosts without AVX-512 (and odd head_dims) take."""
    from fastctx.kernels import sparse

    def run(*args, **kwargs):
        saved, sparse.MICRO_KERNELS = sparse.MICRO_KERNELS, False
        try:
            return fn(*args, **kwargs)
        finally:
            sparse.MICRO_KERNELS = saved
    return run


SPARSE_IMPLS = {
    "cpp": sparse_prefill_attention,
    "cpp-sgemm": _sgemm_path(sparse_prefill_attention),
    "triton": lambda *a, **kw: run_triton(sparse_triton.sparse_prefill_attention_triton, *a, block_n=16, **kw),
}


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("kind", INDEXES)
@pytest.mark.parametrize("heads,kv_heads", GQA.values(), ids=GQA.keys())
@pytest.mark.parametrize("q_len,prefix", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("block_q", [16, 64], ids=["bq16", "bq64"])
def test_sparse_prefill(impl, kind, heads, kv_heads, q_len, prefix, block_q):
    q, k, v, kp, vp = random_qkv(heads, kv_heads, q_len, prefix, 64)
    index = INDEXES[kind](heads, q_len, prefix, block_q)
    got = SPARSE_IMPLS[impl](q, k, v, kp, vp, index=index)
    _close(got, reference_sparse_prefill_attention(q, k, v, kp, vp, index=index), torch.float32)


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dim", [64, 80, 128], ids=["d64", "d80", "d128"])
def test_sparse_prefill_dtypes(impl, dtype, dim):
    if impl == "triton" and dim == 80:
        dim = 64  # Triton takes power-of-two head_dims (the dispatcher never sends it 80)
    q, k, v, kp, vp = random_qkv(9, 3, 100, 40, dim, dtype)
    index = random_vs_index(9, 100, 40, 32)
    got = SPARSE_IMPLS[impl](q, k, v, kp, vp, index=index)
    assert got.dtype == dtype
    _close(got, reference_sparse_prefill_attention(q, k, v, kp, vp, index=index), dtype)


def test_sparse_prefill_scattered_positions():
    """Queries at explicit, scattered positions (recomputed tokens) read keys up to their own position
    (C++ only: the single-sequence Triton kernel takes contiguous chunks)."""
    q, k, v, _, _ = random_qkv(9, 3, 300, 0, 64)
    rows = torch.tensor(sorted(torch.randperm(300, generator=torch.Generator().manual_seed(1))[:40].tolist()))
    rows[-1] = 299
    index = dense_index(9, len(rows), block_q=16, positions=rows)
    got = sparse_prefill_attention(q[:, rows], k, v, index=index)
    want = prefill_attention(q, k, v)[:, rows]
    _close(got, want, torch.float32)
    _close(reference_sparse_prefill_attention(q[:, rows], k, v, index=index), want, torch.float32)


@pytest.mark.parametrize("impl", SPARSE_IMPLS)
def test_sparse_decode_over_selected_pages(impl):
    from fastctx.kernels import lserve as ls

    context = 200
    q, k, v = torch.randn(4, 1, 64), torch.randn(2, context, 64), torch.randn(2, context, 64)
    pages = ls.select_pages(ls.page_scores(q[:, 0], *ls.page_summaries(k, 16)), 16, 16, budget_pages=4)
    index = ls.decode_index(ls.page_ranges(pages, 16, context), context)
    args = (q, k[:, -1:], v[:, -1:], k[:, :-1], v[:, :-1])
    _close(SPARSE_IMPLS[impl](*args, index=index), reference_sparse_prefill_attention(*args, index=index),
           torch.float32)


# ---------------------------------------------------------------- paged_attention (a whole batch)

LAYOUTS = ["vllm_cpu", "token_major", "head_major"]


def _batch(heads, kv_heads, dim, dtype, seed=0):
    """Five requests: two decodes, a prefill chunk after a prefix, a fresh prefill, a short chunk."""
    g = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [1, 1, 90, 64, 3], [70, 301, 250, 64, 40]
    seqs = [(torch.randn(kv_heads, s, dim, generator=g).to(dtype), torch.randn(kv_heads, s, dim, generator=g).to(dtype))
            for s in seq_lens]
    query = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    qs = [0]
    for n in q_lens:
        qs.append(qs[-1] + n)
    return query, seqs, qs, seq_lens


READ_MIXES = {
    "dense": lambda h: [Read.DENSE] * 5,
    "window": lambda h: [Read.window(4, 30)] * 4 + [Read.window(0, 1)],
    "mixed": lambda h: [Read.SKIP, Read.window(2, 50), Read.indexed(random_vs_index(h, 90, 160, 32)),
                        Read.indexed(streaming_index(h, 64, 3, 20, block_q=16)), Read.DENSE],
}


PAGED_IMPLS = {"cpp": paged_attention, "cpp-sgemm": _sgemm_path(paged_attention),
               "triton": lambda *a, **kw: run_triton(triton_paged_attention, *a, **kw)}


@pytest.mark.parametrize("impl", PAGED_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reads", READ_MIXES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads,kv_heads", GQA.values(), ids=GQA.keys())
def test_paged_attention(impl, layout, reads, dtype, heads, kv_heads):
    query, seqs, qs, seq_lens = _batch(heads, kv_heads, 64, dtype)
    kv, table = paged_copy(seqs, layout, block_size=32)
    read_list = READ_MIXES[reads](heads)
    got = PAGED_IMPLS[impl](query, kv, table, qs, seq_lens, read_list, scale=0.125)
    want = reference_paged_attention(query, kv, table, qs, seq_lens, read_list, scale=0.125)
    _close(got, want, dtype)
    if reads == "mixed":  # skipped rows are left as they were
        assert not got[:1].any()


@pytest.mark.parametrize("impl", PAGED_IMPLS)
@pytest.mark.parametrize("dim", [32, 64, 80, 128], ids=["d32", "d64", "d80", "d128"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_paged_attention_split_keys_for_few_items(impl, dim, dtype):
    """One long decode over one KV head is split along the keys across threads and merged (in bf16
    on AVX512-BF16 hosts: the bf16-pair micro-kernels, every head_dim they take)."""
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 5000, dim, generator=g).to(dtype) for _ in range(2))
    kv, table = paged_copy([(k, v)], "vllm_cpu", block_size=128)
    query = torch.randn(1, 2, dim, generator=g).to(dtype)
    for read in (Read.DENSE, Read.window(7, 900)):
        got = PAGED_IMPLS[impl](query, kv, table, [0, 1], [5000], [read], scale=dim ** -0.5)
        want = reference_paged_attention(query, kv, table, [0, 1], [5000], [read], scale=dim ** -0.5)
        _close(got, want, dtype)


@pytest.mark.parametrize("impl", PAGED_IMPLS)
def test_paged_attention_window_with_more_sinks_than_keys(impl):
    """A sink longer than the context reads every key and nothing past the request's blocks."""
    query, seqs, qs, seq_lens = _batch(4, 2, 64, torch.float32)
    kv, table = paged_copy(seqs[4:], "token_major", block_size=16)
    args = (query[qs[4]:], kv, table, [0, 3], [40], [Read.window(64, 2)])
    _close(PAGED_IMPLS[impl](*args, scale=0.125), reference_paged_attention(*args, scale=0.125), torch.float32)


def test_paged_attention_explicit_positions_equal_dense_rows():
    query, seqs, qs, seq_lens = _batch(9, 3, 64, torch.float32)
    kv, table = paged_copy(seqs[2:3], "vllm_cpu", block_size=32)
    k, v = seqs[2]
    q_all = torch.randn(250, 9, 64, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([0, 3, 17, 100, 101, 180, 249])
    got = paged_attention(q_all[rows], kv, table, [0, len(rows)], [250], [Read.DENSE], scale=0.125,
                          positions=rows.int())
    whole = prefill_attention(q_all.transpose(0, 1), k, v, scale=0.125).transpose(0, 1)
    _close(got, whole[rows], torch.float32)


@pytest.mark.parametrize("impl", PAGED_IMPLS)
def test_index_columns_from_the_panel_and_copied(impl):
    """Columns are gathered once per head into a panel; a block listing most of the panel's columns
    scores it in place (masking the rest), one listing few copies them: both equal the reference."""
    from fastctx.kernels.sparse import SparseIndex

    g = torch.Generator().manual_seed(11)
    heads, q_len, block = 6, 256, 32
    k, v = torch.randn(2, 600, 64, generator=g), torch.randn(2, 600, 64, generator=g)
    kv, table = paged_copy([(k, v)], "vllm_cpu", block_size=128)
    blocks = q_len // block
    union = torch.randperm(600, generator=g)[:120].sort().values
    cols = torch.full((heads, blocks, 120), -1, dtype=torch.int32)
    for h in range(heads):
        for r in range(blocks):
            keep = union[torch.rand(120, generator=g) < (0.9 if (h + r) % 2 else 0.1)]
            cols[h, r, :len(keep)] = keep.int()
    ranges = torch.tensor([[344, 0]], dtype=torch.int32).expand(heads, blocks, 1, 2).clone()
    ranges[:, :, 0, 1] = 344 + (torch.arange(blocks) + 1) * block  # each block's own diagonal keys
    ranges[:, :, 0, 0] = 344 + torch.arange(blocks) * block
    cols = torch.where((cols >= 344) & (cols < 600), -1, cols)  # columns outside the ranges
    index = SparseIndex(ranges, cols, q_len, prefix=344, block_q=block)
    query = torch.randn(q_len, heads, 64, generator=g)
    got = PAGED_IMPLS[impl](query, kv, table, [0, q_len], [600], [Read.indexed(index)], scale=0.125)
    want = reference_paged_attention(query, kv, table, [0, q_len], [600], [Read.indexed(index)], scale=0.125)
    _close(got, want, torch.float32)


def test_decode_batch_shares_one_index():
    """A decode batch can hand one index with a block per request (block0 = the request's row)."""
    query, seqs, qs, seq_lens = _batch(4, 2, 64, torch.float32)
    kv, table = paged_copy(seqs[:2], "vllm_cpu", block_size=32)
    ranges = torch.tensor([[[[0, 10], [60, 70]]], [[[5, 100], [290, 301]]]], dtype=torch.int32)  # [B, 1, 2, 2]
    ranges = ranges.permute(1, 0, 2, 3).expand(4, -1, -1, -1).contiguous()  # [H, B, NR, 2]
    from fastctx.kernels.sparse import SparseIndex

    shared = SparseIndex(ranges, torch.full((4, 2, 1), -1, dtype=torch.int32), q_len=2, block_q=1)
    reads = [Read.indexed(shared, block0=0), Read.indexed(shared, block0=1)]
    got = paged_attention(query[:2], kv, table, [0, 1, 2], [70, 301], reads, scale=0.125)
    want = reference_paged_attention(query[:2], kv, table, [0, 1, 2], [70, 301], reads, scale=0.125)
    _close(got, want, torch.float32)


# ---------------------------------------------------------------- last_query_sums and pooled_keys


def _seq(impl, k):
    if impl == "cpp-paged":
        kv, table = paged_copy([(k, k)], "vllm_cpu", block_size=32)
        return SeqKV(kv, table[0], k.shape[1])
    return k


SUMS_IMPLS = {
    "cpp": lambda q, k, prefix, last_q: last_query_sums(q, _seq("cpp", k), prefix, last_q, 0.2),
    "cpp-paged": lambda q, k, prefix, last_q: last_query_sums(q, _seq("cpp-paged", k), prefix, last_q, 0.2),
    "triton": lambda q, k, prefix, last_q: run_triton(sparse_triton.last_query_sums_triton, q, k, prefix, last_q,
                                                      0.2, block_n=16),
}


@pytest.mark.parametrize("impl", SUMS_IMPLS)
@pytest.mark.parametrize("heads,kv_heads,q_len,prefix,last_q,dtype", [
    (9, 3, 100, 0, 64, torch.float32), (4, 4, 40, 200, 64, torch.float32), (8, 1, 70, 30, 32, torch.float32),
    (9, 3, 20, 45, 64, torch.float32), (9, 3, 128, 300, 128, torch.float32), (2, 1, 50, 10, 16, torch.bfloat16)],
    ids=["gqa-fresh", "mha-after-prefix", "mqa", "chunk-shorter-than-last_q", "flexprefill-128", "bf16"])
def test_last_query_sums(impl, heads, kv_heads, q_len, prefix, last_q, dtype):
    q, k, _, kp, _ = random_qkv(heads, kv_heads, q_len, prefix, 64, dtype)
    k = torch.cat([kp, k], 1)
    got = SUMS_IMPLS[impl](q, k, prefix, last_q)
    want = reference_last_query_sums(q, k, prefix, last_q, 0.2)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, atol=1e-5, rtol=1e-4)


def test_last_query_sums_per_head_kv_map():
    """A subset of a layer's heads (MInference's per-head patterns) reads each head's own KV head."""
    q, k, _, _, _ = random_qkv(9, 3, 80, 0, 64)
    heads = torch.tensor([1, 4, 8])
    kv_of = heads // 3
    got = last_query_sums(q[heads], _seq("cpp-paged", k), 0, 64, 0.2, kv_head_of=kv_of)
    want = reference_last_query_sums(q, k, 0, 64, 0.2)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w[heads], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["cpp", "cpp-paged"])
@pytest.mark.parametrize("tokens,block", [(300, 64), (128, 128), (97, 32)])
def test_pooled_keys(impl, tokens, block):
    k = torch.randn(3, tokens, 64, generator=torch.Generator().manual_seed(tokens))
    torch.testing.assert_close(pooled_keys(_seq(impl, k), block), pool_blocks(k, block), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fast_paths_run_where_the_cpu_has_them(dtype):
    """The grids above must exercise the CPU's fast paths, not fall back silently: AVX-512 hosts
    take the micro-kernels, and bf16 goes through AMX tiles where the CPU has them."""
    from fastctx.kernels._cpu_ext import cpu_features
    from fastctx.kernels.attention import kernel_path

    features = cpu_features()
    want = "sgemm"
    if features["avx512f"]:
        want = "amx" if dtype == torch.bfloat16 and features["avx512_bf16"] and features["amx_bf16"] else "micro"
    assert kernel_path(dtype, 64) == want
    assert kernel_path(dtype, 80) == "sgemm"


@pytest.mark.parametrize("impl", ["cpp", "cpp-sgemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tree_verification_reads_each_chain_as_a_causal_sequence(impl, dtype):
    """SpecTr's chains laid out as one draft tree after each request's context (SGLang's verification
    batch): every node attends as it would in a causal prefill of the context, the root and its chain."""
    from fastctx.kernels.sparse import tree_index
    from fastctx.specdec.tree import accepted_path, chain_tree, tree_size

    heads, kv_heads, dim, chains, depth, contexts = 9, 3, 64, 3, 2, [37, 130]
    n = tree_size(chains, depth)
    g = torch.Generator().manual_seed(3)
    seqs = [tuple(torch.randn(kv_heads, c + n, dim, generator=g).to(dtype) for _ in range(2)) for c in contexts]
    query = torch.randn(len(contexts) * n, heads, dim, generator=g).to(dtype)
    kv, table = paged_copy(seqs, "vllm_cpu", block_size=32)
    reads = [Read.indexed(tree_index(chain_tree(chains, depth), c, heads)) for c in contexts]
    got = PAGED_IMPLS[impl](query, kv, table, [0, n, 2 * n], [c + n for c in contexts], reads, scale=dim ** -0.5)
    for b, c in enumerate(contexts):
        k, v = seqs[b]
        for chain in range(chains):
            nodes = accepted_path(chain, depth, depth)
            rows = [b * n + node for node in nodes]
            keys = [c + node for node in nodes]
            want = prefill_attention(query[rows].transpose(0, 1), k[:, keys], v[:, keys], k[:, :c], v[:, :c],
                                     scale=dim ** -0.5).transpose(0, 1)
            _close(got[rows], want, dtype)


def test_a_tree_mask_must_mark_each_node_and_only_earlier_ones():
    from fastctx.kernels.sparse import tree_index

    with pytest.raises(ValueError, match="parents come first"):
        tree_index(torch.ones(3, 3, dtype=torch.bool), 10, 2)
    with pytest.raises(ValueError, match="parents come first"):
        tree_index(torch.zeros(3, 3, dtype=torch.bool), 10, 2)
