"""The sparse index format: builders, masks, density counts, and properties of the sparse op
(the reference-vs-implementation grid is tests/test_kernel_grid.py)."""

import pytest
import torch

from fastctx.kernels import prefill_attention
from fastctx.kernels.sparse import (
    dense_index,
    reference_sparse_prefill_attention,
    sparse_prefill_attention,
    streaming_index,
    vertical_slash_index,
)
from tests.helpers import INDEXES, random_qkv, random_vs_index, vertical_slash_index_loop


@pytest.mark.parametrize("gather_below", [0, 40, 10**6])
def test_short_ranges_gathered_or_scored_in_place_give_the_same_output(monkeypatch, gather_below):
    import fastctx.kernels.sparse as sparse

    monkeypatch.setattr(sparse, "GATHER_BELOW", gather_below)
    q, k, v, kp, vp = random_qkv(9, 3, 300, 200, 64)
    index = random_vs_index(9, 300, 200, 32)
    torch.testing.assert_close(sparse_prefill_attention(q, k, v, kp, vp, index=index),
                               reference_sparse_prefill_attention(q, k, v, kp, vp, index=index),
                               atol=1e-5, rtol=1e-5)


def test_density_one_equals_dense_attention():
    q, k, v, kp, vp = random_qkv(9, 3, 300, 50, 64)
    index = dense_index(9, 300, 50)
    assert index.density() == 1.0
    torch.testing.assert_close(sparse_prefill_attention(q, k, v, kp, vp, index=index),
                               prefill_attention(q, k, v, kp, vp), atol=1e-5, rtol=1e-5)
    # A vertical-slash index whose diagonals cover every offset is dense too.
    vs = vertical_slash_index(torch.zeros(9, 1, dtype=torch.long), torch.arange(350).expand(9, -1), 300, 50)
    assert vs.density() == 1.0
    torch.testing.assert_close(sparse_prefill_attention(q, k, v, kp, vp, index=vs),
                               prefill_attention(q, k, v, kp, vp), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(INDEXES))
@pytest.mark.parametrize("chunk", [None, 1, 3000], ids=["whole", "block-by-block", "few-blocks"])
def test_density_counts_the_mask(kind, chunk, monkeypatch):
    from fastctx.kernels import sparse

    if chunk is not None:  # elements counted at once: as for a long index, a few blocks at a time
        monkeypatch.setattr(sparse, "_COUNT_ELEMENTS", chunk)
    index = INDEXES[kind](9, 150, 30, 32)
    mask = index.mask()
    causal = sum(30 + i + 1 for i in range(150)) * 9
    assert index.density() == pytest.approx(mask.sum().item() / causal)


def test_chunked_equals_whole_prefill_rows():
    # A chunk after a cached prefix reads the same keys as those rows of one whole prefill.
    q, k, v, _, _ = random_qkv(9, 3, 256, 0, 64)
    whole = sparse_prefill_attention(q, k, v, index=streaming_index(9, 256, 4, 32, block_q=32))
    tail = sparse_prefill_attention(q[:, 160:], k[:, 160:], v[:, 160:], k[:, :160], v[:, :160],
                                    index=streaming_index(9, 96, 4, 32, prefix=160, block_q=32))
    torch.testing.assert_close(tail, whole[:, 160:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,q_len,prefix,block_q", [(9, 150, 0, 64), (4, 97, 130, 16), (3, 1000, 333, 32),
                                                      (2, 5, 0, 64), (5, 300, 700, 128)])
def test_vertical_slash_index_equals_the_per_head_loop_and_covers_its_lines(heads, q_len, prefix, block_q):
    g = torch.Generator().manual_seed(q_len)
    total = prefix + q_len
    vertical = torch.randint(-1, total + 20, (heads, 40), generator=g)  # repeats, -1 and out of range
    slash = torch.cat([torch.arange(min(5, total)).expand(heads, -1),
                       torch.randint(0, total + 20, (heads, 60), generator=g)], 1)
    got = vertical_slash_index(vertical, slash, q_len, prefix, block_q)
    want = vertical_slash_index_loop(vertical, slash, q_len, prefix, block_q)
    mask = got.mask()
    assert torch.equal(mask, want.mask())
    assert got.pair_counts() == want.pair_counts() == (int(mask.sum()), got.pair_counts()[1])
    # Every selected column and diagonal is read (merging may add keys between touching diagonals).
    pos = prefix + torch.arange(q_len)
    keys = torch.arange(total)
    for h in range(heads):
        on_line = torch.isin(keys, vertical[h])[None] | torch.isin(pos[:, None] - keys[None], slash[h])
        assert not (on_line & (keys[None] <= pos[:, None]) & ~mask[h]).any()


def test_index_shape_mismatch_is_an_error():
    q, k, v, kp, vp = random_qkv(9, 3, 10, 5, 64)
    with pytest.raises(ValueError, match="index is for"):
        sparse_prefill_attention(q, k, v, kp, vp, index=dense_index(9, 10, 0))


def test_ragged_batch_equals_each_sequence():
    from fastctx.kernels.sparse import sparse_prefill_attention_varlen

    lengths = [5, 130, 1, 64]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v, _, _ = random_qkv(9, 3, cu[-1], 0, 64)
    indexes = [random_vs_index(9, n, 0, 32, seed=i) for i, n in enumerate(lengths)]
    got = sparse_prefill_attention_varlen(q, k, v, cu, indexes)
    for index, a, b in zip(indexes, cu, cu[1:]):
        want = reference_sparse_prefill_attention(q[:, a:b], k[:, a:b], v[:, a:b], index=index)
        torch.testing.assert_close(got[:, a:b], want, atol=1e-5, rtol=1e-5)


def test_row_reference_matches_full_reference():
    from fastctx.kernels.sparse import reference_sparse_rows

    q, k, v, kp, vp = random_qkv(9, 3, 120, 30, 64)
    index = random_vs_index(9, 120, 30, 32)
    rows = torch.tensor([0, 31, 32, 119])
    full = reference_sparse_prefill_attention(q, k, v, kp, vp, index=index)
    part = reference_sparse_rows(q, torch.cat([kp, k], 1), torch.cat([vp, v], 1), index=index, rows=rows)
    torch.testing.assert_close(part, full[:, rows])


def test_attention_recall():
    from fastctx.kernels.sparse import attention_recall

    q, k, _, kp, _ = random_qkv(9, 3, 100, 20, 64)
    k_all = torch.cat([kp, k], 1)
    rows = torch.tensor([0, 50, 99])
    assert torch.allclose(attention_recall(q, k_all, index=dense_index(9, 100, 20), rows=rows), torch.ones(9))
    index = streaming_index(9, 100, sink=2, local=10, prefix=20, block_q=16)
    scores = torch.einsum("htd,hsd->hts", q[:, rows], k_all.repeat_interleave(3, 0)) * 64 ** -0.5
    causal = torch.arange(120)[None] <= (20 + rows)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    want = (probs * index.mask(rows)).sum(-1).mean(-1)
    torch.testing.assert_close(attention_recall(q, k_all, index=index, rows=rows), want)
    assert (want < 1).all()


def test_last_rows_pair_counts_equal_the_mask():
    """The integer / C++ count the runtime uses per layer equals the general count and the mask."""
    from fastctx.kernels import lserve as ls
    from fastctx.kernels.attention import Read

    decode = ls.reference_decode_ranges(torch.tensor([[0, 2, 3], [1, 4, 5]]), torch.tensor([False, True, False]),
                                        3, 64, 16, 128)
    reads = [Read.DENSE, Read.window(4, 30), Read.window(0, 500), Read.indexed(ls.decode_index(decode, 300)),
             Read.indexed(dense_index(9, 5, 295, block_q=8))]
    for read in reads:
        for q_len in (1, 5):
            pos = 300 - q_len + torch.arange(q_len)
            causal = torch.arange(300)[None] <= pos[:, None]
            mask = read.mask(pos, 300)
            mask = causal if mask is None else mask & causal  # (a mask says what is read besides causality)
            want = int(mask.expand(9, -1, -1).sum()), int((pos + 1).sum()) * 9
            assert read.last_rows_pair_counts(q_len, 300, 9) == read.pair_counts(pos, 9) == want


def test_density_stats_add_counts_left_on_an_accelerator_and_report_ints():
    """On an accelerator an index's read count stays there as a 0-d tensor (no read-back per layer);
    the runtime's stats add such counts as they add ints and report plain ints (they cross RPCs)."""
    from fastctx.core import DensityStats

    on_host, on_device = DensityStats(), DensityStats()
    for read, causal, chunks in ((30, 50, 1), (50, 50, 1), (70, 120, 3)):
        sparse = read < causal
        on_host.add(read, causal, sparse, chunks)
        count = torch.tensor(read)
        on_device.add(count, causal, count < causal, chunks)
    assert on_device.as_dict() == on_host.as_dict() == {
        "density": round(150 / 220, 4), "read_pairs": 150, "causal_pairs": 220, "sparse_chunks": 2, "dense_chunks": 3}
    assert all(type(v) in (int, float) for v in on_device.as_dict().values())
