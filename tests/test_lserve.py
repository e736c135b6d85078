"""LServe: page bounds, selection, the method's prefill and decode reads, knobs, calibration files."""

import json

import pytest
import torch

from fastctx.kernels import lserve as ls
from fastctx.kernels.attention import Read, paged_attention, reference_paged_attention
from fastctx.kernels.paged import PagedKV, SeqKV
from fastctx.methods import DecodeBatch, KnobError, ModelShape, PrefillChunk
from fastctx.methods.lserve import LServe, LServeParams, streaming_kv_heads
from tests.kernel_impls import paged_copy

SHAPE = ModelShape(num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64)


def test_summaries_bound_every_key():
    k = torch.randn(3, 50, 64)
    kmin, kmax = ls.page_summaries(k, 16)
    assert kmin.shape == (3, 4, 64)
    for p in range(4):
        page = k[:, p * 16:(p + 1) * 16]
        assert torch.equal(kmin[:, p], page.amin(1)) and torch.equal(kmax[:, p], page.amax(1))


@pytest.mark.parametrize("cpu_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_stats_grow_with_the_cache_and_equal_the_summaries(dtype, cpu_kernel):
    k = torch.randn(3, 2600, 64).to(dtype)  # 163 logical pages: three spans, storage grown twice
    kv, table = paged_copy([(k, k)], "vllm_cpu", block_size=32)
    stats = ls.PageStats(16)
    for length in (1, 15, 16, 17, 300, 301, 333, 699, 700, 1023, 1024, 1025, 2047, 2600):
        stats.extend(SeqKV(kv, table[0], length), cpu_kernel=cpu_kernel)
        want = ls.page_summaries(k[:, :length], 16)
        for got, ref in zip(stats.bounds(), want):
            assert torch.equal(got, ref)


def test_page_score_is_an_upper_bound_of_every_dot_product():
    q, k = torch.randn(9, 64), torch.randn(3, 160, 64)
    scores = ls.page_scores(q, *ls.page_summaries(k, 16))
    dots = torch.einsum("hd,htd->ht", q, k.repeat_interleave(3, 0)).view(9, 10, 16).amax(-1)
    assert (scores >= dots - 1e-4).all()
    lo, hi = ls.page_summaries(k, 16)
    qf = q[:, None, :]
    direct = torch.maximum(qf * lo.repeat_interleave(3, 0), qf * hi.repeat_interleave(3, 0)).sum(-1)
    torch.testing.assert_close(scores, direct, atol=1e-4, rtol=1e-5)


def test_selection_respects_budget_keeps_newest_and_finds_the_hot_page():
    q, k = torch.randn(9, 64), torch.randn(3, 1000, 64)
    k[:, 333] = 5 * q[::3]  # one key each KV group's first head aligns with
    pages = ls.select_pages(ls.page_scores(q, *ls.page_summaries(k, 16)), 16, 64, budget_pages=4)
    assert pages.shape == (9, 4) and (pages[:, -1] == 15).all()
    assert (pages[::3] == 333 // 64).any(-1).all()
    assert (pages[:, 1:] > pages[:, :-1]).all()


def test_hierarchical_page_score_is_the_max_of_its_logical_pages():
    scores = torch.tensor([[0.0, 9.0, 1.0, 1.0, 5.0, 5.0, 0.0, 0.0, 2.0]])  # 9 logical pages, 5 physical of 2
    assert ls.select_pages(scores, 16, 32, budget_pages=3).tolist() == [[0, 2, 4]]


def test_short_context_reads_every_page():
    pages = ls.select_pages(torch.randn(9, 7), 16, 64, budget_pages=64)
    assert pages.shape == (9, 2)
    ranges = ls.page_ranges(pages, 64, 100)
    assert ranges[:, 0].tolist() == [[0, 100]] * 9


def test_page_ranges_merge_neighbours_and_pad_last():
    ranges = ls.page_ranges(torch.tensor([[0, 1, 5, 9], [2, 3, 4, 9]]), 16, 150)
    assert ranges[0].tolist() == [[0, 32], [80, 96], [144, 150]]
    assert ranges[1, :2].tolist() == [[32, 80], [144, 150]] and ranges[1, 2, 0] >= ranges[1, 2, 1]


def _decode_batch(kv, table, seq_lens, query, states, layer=0):
    qs = list(range(len(seq_lens) + 1))
    return DecodeBatch(query=query, query_start=qs, seq_lens=seq_lens, kv=kv, block_table=table, layer=layer,
                       scale=0.125, states=states)


def test_decode_with_budget_over_context_and_no_streaming_heads_is_dense():
    method = LServe(LServeParams(streaming_fraction=0, token_budget=4096), SHAPE)
    k = torch.randn(3, 500, 64)
    kv, table = paged_copy([(k, k)], "vllm_cpu", block_size=32)
    batch = _decode_batch(kv, table, [500], torch.randn(1, 9, 64), [method.new_state("decode", 0)])
    assert method.decode(batch) == [Read.DENSE]


def _scores_file(tmp_path, scores):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"method": "lserve", "scores": scores}))
    return str(path)


def test_decode_reads_selected_pages_and_windows_and_equals_reference(tmp_path):
    scores = _scores_file(tmp_path, [[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    params = LServeParams(streaming_fraction=0.5, head_scores=scores, token_budget=256, page_size=64,
                          decode_sink=16, decode_local=64, reselect_interval=2)
    method = LServe(params, SHAPE)
    assert method.streaming[0].view(3, 3)[:, 0].tolist() == [False, True, True]  # 0.1 < 0.2 < 0.5: 3 streaming
    assert method.streaming[1].view(3, 3)[:, 0].tolist() == [True, False, False]
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randn(3, n, 64, generator=g), torch.randn(3, n, 64, generator=g)) for n in (1500, 200, 2000)]
    kv, table = paged_copy(seqs, "vllm_cpu", block_size=32)
    states = [method.new_state("decode", 0) for _ in seqs]
    for step in range(3):
        lens = [len_ + step for len_ in (1497, 200, 1990)]
        query = torch.randn(3, 9, 64, generator=g)
        reads = method.decode(_decode_batch(kv, table, lens, query, states))
        got = paged_attention(query, kv, table, [0, 1, 2, 3], lens, reads, scale=0.125)
        want = reference_paged_attention(query, kv, table, [0, 1, 2, 3], lens, reads, scale=0.125)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        index = reads[0].index
        pos = torch.tensor([lens[0] - 1])
        read, causal = reads[0].pair_counts(pos, 9)
        # 3 dense heads read at most the budget plus the newest page; 6 streaming heads 16 sinks plus
        # the pages holding the last 64 keys
        assert read <= 3 * (256 + 64) + 6 * (16 + 128) and causal == 9 * lens[0]
        mask = reads[0].mask(pos, lens[0])[:, 0]
        streaming = method.streaming[0]
        assert mask[streaming][:, :16].all() and mask[streaming][:, -64:].all()
        assert (mask[streaming].sum(-1) <= 16 + 128).all()
        assert mask[~streaming, lens[0] - 1].all() and (mask[~streaming].sum(-1) <= 256 + 64).all()
        assert index.block_q >= 1
    assert states[0].steps == 3 and states[0].stats.length == 1499  # bounds updated at selections (steps 0, 2)


def test_prefill_streaming_heads_read_the_window_others_everything(tmp_path):
    scores = _scores_file(tmp_path, [[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    method = LServe(LServeParams(streaming_fraction=0.5, head_scores=scores, prefill_sink=8, prefill_local=100), SHAPE)
    q, k = torch.randn(9, 300, 64), torch.randn(3, 300, 64)
    read = method.prefill(PrefillChunk(q=q, keys=SeqKV.contiguous(k), prefix=0, positions=None, layer=0,
                                       scale=0.125, state=None))
    mask = read.mask(torch.arange(300), 300)
    streaming = method.streaming[0]
    causal = torch.ones(300, 300).tril().bool()
    assert torch.equal(mask[~streaming], causal.expand(3, -1, -1))
    assert (mask[streaming].sum(-1)[:, -1] <= 8 + 100 + 63).all() and mask[streaming][:, 250, :8].all()


def test_all_or_no_streaming_heads_need_no_file():
    assert LServe(LServeParams(streaming_fraction=1), SHAPE).streaming.all()
    assert not LServe(LServeParams(streaming_fraction=0), SHAPE).streaming.any()


@pytest.mark.parametrize("knobs,match", [
    ({"streaming_fraction": 1.5}, "streaming_fraction"),
    ({"streaming_fraction": 0, "token_budget": 64}, "token_budget"),
    ({"streaming_fraction": 0, "page_size": 64, "logical_page_size": 24}, "logical_page_size"),
    ({"streaming_fraction": 0, "reselect_interval": 0}, "reselect_interval"),
])
def test_bad_knobs_say_what_to_change(knobs, match):
    with pytest.raises(KnobError, match=match):
        LServeParams(**knobs)


def test_calibration_file_must_fit_the_model(tmp_path):
    with pytest.raises(KnobError, match="head_scores"):
        streaming_kv_heads(LServeParams(streaming_fraction=0.5), SHAPE)
    path = _scores_file(tmp_path, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="fastctx lserve calibrate"):
        streaming_kv_heads(LServeParams(streaming_fraction=0.5, head_scores=path), SHAPE)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    with pytest.raises(ValueError, match="not a `fastctx lserve calibrate` file"):
        streaming_kv_heads(LServeParams(streaming_fraction=0.5, head_scores=str(garbage)), SHAPE)
    with pytest.raises(KnobError, match="is not a file"):
        LServeParams(head_scores=str(tmp_path / "missing.json"))


def test_contiguous_kv_reads_ranges_like_gather():
    k, v = torch.randn(3, 90, 64), torch.randn(3, 90, 64)
    kv = PagedKV.contiguous(k, v)
    table = torch.zeros(1, dtype=torch.int32)
    assert torch.equal(kv.read_range(kv.key, table, 17, 60), k[:, 17:60])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "streaming", "dim"), [
    (9, [False, False, False], 64), (9, [True, False, True], 64),  # SmolLM2's groups of 3
    (12, [False, True], 128),  # groups of 6: more query heads than one pass of the C++ kernel takes
    (3, [False, False, True], 32),  # MHA
])
def test_cpu_selection_and_ranges_equal_the_reference(dtype, heads, streaming, dim):
    g = torch.Generator().manual_seed(1)
    kv_heads = len(streaming)
    k = torch.randn(kv_heads, 3000, dim, generator=g).to(dtype)
    kv, table = paged_copy([(k, k)], "vllm_cpu", block_size=32)
    stats = ls.PageStats(16)
    stats.extend(SeqKV(kv, table[0], 2990))
    q = torch.randn(heads, dim, generator=g).to(dtype)
    mask = torch.tensor(streaming)
    kmin, kmax = (b.float() for b in stats.bounds())
    for budget in (8, 47, 500):
        got = ls.select(q, stats, mask, 64, budget)
        want = ls.reference_select(q.float(), kmin, kmax, mask, 16, 64, budget)
        assert torch.equal(got.long(), want.long())
        for sink, local_start in ((16, 2900), (0, 0), (128, 64)):
            group = heads // kv_heads
            assert torch.equal(ls.decode_ranges(got, mask, group, 64, sink, local_start),
                               ls.reference_decode_ranges(got, mask, group, 64, sink, local_start))


def test_decode_pair_counts_equal_the_mask():
    ranges = ls.reference_decode_ranges(torch.tensor([[0, 3, 4, 9], [1, 2, 7, 9]]), torch.tensor([False, True, False]),
                                        3, 64, 16, 512)
    read = Read.indexed(ls.decode_index(ranges, 700))
    for pos in (699, 600, 300):
        row = torch.tensor([pos])
        assert read.pair_counts(row, 9) == (int(read.mask(row, pos + 1).sum()), 9 * (pos + 1))
