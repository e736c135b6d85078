import pytest
import torch

from fastctx.kernels import lserve as ls
from fastctx.kernels.sparse import reference_sparse_prefill_attention, sparse_prefill_attention


def test_summaries_bound_every_key():
    k = torch.randn(3, 50, 64)
    kmin, kmax = ls.page_summaries(k, 16)
    assert kmin.shape == (3, 4, 64)
    for p in range(4):
        page = k[:, p * 16:(p + 1) * 16]
        assert torch.equal(kmin[:, p], page.amin(1)) and torch.equal(kmax[:, p], page.amax(1))


def test_page_score_is_an_upper_bound_of_every_dot_product():
    q, k = torch.randn(9, 64), torch.randn(3, 160, 64)
    kmin, kmax = ls.page_summaries(k, 16)
    scores = ls.page_scores(q, kmin, kmax)
    dots = torch.einsum("hd,htd->ht", q, k.repeat_interleave(3, 0)).view(9, 10, 16).amax(-1)
    assert (scores >= dots - 1e-4).all()


def test_selection_respects_budget_keeps_newest_and_finds_the_hot_page():
    q, k = torch.randn(9, 64), torch.randn(3, 1000, 64)
    k[:, 333] = 5 * q[::3]  # one key each KV group's first head aligns with
    kmin, kmax = ls.page_summaries(k, 16)
    params = ls.LServeParams(token_budget=128, page_size=16)
    sel = ls.select_pages(q, kmin, kmax, params)
    assert (sel.sum(-1) == 8).all() and sel[:, -1].all()
    assert sel[::3, 333 // 16].all()


def test_short_context_reads_everything():
    q, k = torch.randn(9, 64), torch.randn(3, 100, 64)
    sel = ls.select_pages(q, *ls.page_summaries(k), ls.LServeParams(token_budget=4096))
    assert sel.all()
    assert ls.page_index(sel, 100).density() == 1.0


def test_decode_over_selected_pages_matches_reference():
    context = 1000
    q, k, v = torch.randn(9, 1, 64), torch.randn(3, context, 64), torch.randn(3, context, 64)
    sel = ls.select_pages(q[:, 0], *ls.page_summaries(k), ls.LServeParams(token_budget=256))
    index = ls.page_index(sel, context)
    assert index.density() == pytest.approx(256 / context, abs=16 / context)
    args = (q, k[:, -1:], v[:, -1:], k[:, :-1], v[:, :-1])
    torch.testing.assert_close(sparse_prefill_attention(*args, index=index),
                               reference_sparse_prefill_attention(*args, index=index), atol=1e-5, rtol=1e-5)


def test_bad_params():
    with pytest.raises(ValueError, match="token_budget"):
        ls.LServeParams(token_budget=8, page_size=16)
