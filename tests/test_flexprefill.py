import pytest
import torch

from fastctx.kernels.sparse import attention_recall, reference_sparse_prefill_attention, sparse_prefill_attention
from fastctx.methods import flexprefill as fp


def _qkv(q_len, prefix=0, heads=9, kv_heads=3, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, q_len, dim, generator=g)
    k = torch.randn(kv_heads, prefix + q_len, dim, generator=g)
    v = torch.randn(kv_heads, prefix + q_len, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("prefix", [0, 200])
def test_mask_is_causal_keeps_diagonal_and_first_column(prefix):
    q, k, _ = _qkv(700, prefix)
    params = fp.FlexPrefillParams(min_budget=128, block_size=64)
    mask, _ = fp.block_mask(q, k, params, prefix=prefix)
    first = prefix + torch.arange(mask.shape[1]) * 64
    last = torch.clamp(first + 63, max=prefix + 699)
    for r in range(mask.shape[1]):
        assert mask[:, r, 0].all() and mask[:, r, last[r] // 64].all()
        assert not mask[:, r, last[r] // 64 + 1:].any()


def test_js_distance_properties():
    p = torch.softmax(torch.randn(4, 10), -1)
    assert torch.allclose(fp.sqrt_js_divergence(p, p), torch.zeros(4), atol=1e-4)
    one_hot = torch.eye(10)[:2]
    assert torch.allclose(fp.sqrt_js_divergence(one_hot[:1], one_hot[1:]), torch.tensor([0.6931 ** 0.5]), atol=1e-3)


def test_query_aware_when_the_pooled_estimate_is_right():
    # Keys identical within each block make block pooling exact: every head is query-aware.
    q, k, _ = _qkv(512)
    k = k[:, ::64].repeat_interleave(64, 1)
    _, aware = fp.block_mask(q, k, fp.FlexPrefillParams(block_size=64, min_budget=64))
    assert aware.all()
    # A single sharp key that pooling blurs makes heads vertical-slash.
    q, k, _ = _qkv(512, seed=1)
    k[:, 100] = 6 * q[::3, -64:].mean(1)
    _, aware = fp.block_mask(q, k, fp.FlexPrefillParams(block_size=64, min_budget=64, tau=0.05))
    assert not aware[::3].all()


def test_gamma_one_with_large_budget_is_dense():
    q, k, _ = _qkv(400)
    index = fp.sparse_index(q, k, fp.FlexPrefillParams(gamma=1.0, min_budget=10_000, block_size=64))
    assert index.density() == 1.0


@pytest.mark.parametrize("prefix", [0, 130])
def test_index_runs_on_the_kernel_and_is_sparse(prefix):
    q, k, v = _qkv(900, prefix)
    # Random keys spread attention evenly; a low gamma keeps the index sparse anyway.
    index = fp.sparse_index(q, k, fp.FlexPrefillParams(gamma=0.5, min_budget=64, block_size=64), prefix=prefix)
    assert 0 < index.density() < 1
    args = (q, k[:, prefix:], v[:, prefix:], k[:, :prefix], v[:, :prefix])
    torch.testing.assert_close(sparse_prefill_attention(*args, index=index),
                               reference_sparse_prefill_attention(*args, index=index), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,needle", [({"gamma": 0}, "gamma"), ({"tau": -1}, "tau"),
                                           ({"block_size": 100}, "block_size"),
                                           ({"min_budget": 512, "max_budget": 256}, "min_budget <= max_budget")])
def test_bad_params_say_what_to_change(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fp.FlexPrefillParams(**kwargs)


def test_block_mass_covers_gamma_where_token_count_falls_short():
    # Late queries attend to one key in each of 12 key blocks: 12 tokens hold the mass, so the
    # reference code's shortcut reads 12 // 64 + 1 = 1 block of them; block_mass reads all 12.
    q, k, _ = _qkv(1024, seed=3)
    q, k = q * 0.1, k * 0.1
    u = torch.randn(64)
    q[:, -64:] += 3 * u
    planted = [64 * j + 17 for j in range(2, 14)]
    k[:, planted] = 3 * u
    rows = torch.arange(1024 - 64, 1024)
    recall = {}
    for selection in fp.BLOCK_SELECTIONS:
        params = fp.FlexPrefillParams(gamma=0.9, min_budget=64, block_size=64, tau=0.0, block_selection=selection)
        index = fp.sparse_index(q, k, params)
        recall[selection] = float(attention_recall(q, k, index=index, rows=rows).mean())
    assert recall["block_mass"] >= 0.9 > recall["token_count"]


def test_block_selection_is_validated():
    with pytest.raises(ValueError, match="block_selection"):
        fp.FlexPrefillParams(block_selection="tokens")
