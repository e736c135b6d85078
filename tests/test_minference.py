import json

import pytest
import torch

from fastctx.kernels.estimation import diagonal_sums, last_query_sums
from fastctx.kernels.sparse import reference_sparse_prefill_attention, sparse_prefill_attention
from fastctx.methods import minference as mi


def _qk(heads=9, kv_heads=3, q_len=300, prefix=0, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, q_len, dim, generator=g)
    k = torch.randn(kv_heads, prefix + q_len, dim, generator=g)
    return q, k


def test_vertical_slash_keeps_sinks_local_and_finds_planted_column_and_diagonal():
    q, k = _qk(q_len=600)
    # KV head 0 (query heads 0-2): a key column every late query attends to.
    u = torch.randn(64)
    q[0:3, -64:] += 2 * u
    k[0, 400] = 2 * u
    # KV head 1 (query heads 3-5): each late query attends to the key 250 positions back.
    k[1, 600 - 64 - 250:600 - 250] = 2 * q[3, -64:]
    v_idx, s_idx = mi.vertical_slash(q, k, 60, 120)
    for h in range(9):
        assert set(range(mi.SINK_COLUMNS)) <= set(v_idx[h].tolist())
        assert set(range(mi.LOCAL_DIAGONALS)) <= set(s_idx[h].tolist())
    assert all(400 in v_idx[h].tolist() for h in range(0, 3))
    assert 250 in s_idx[3].tolist()


def test_per_head_budgets():
    q, k = _qk()
    v_idx, s_idx = mi.vertical_slash(q, k, torch.tensor([30] * 8 + [200]), torch.tensor([50] * 8 + [250]))
    assert v_idx.shape == (9, 200) and s_idx.shape == (9, 250)
    assert len(set(v_idx[0].tolist())) == 30 and len(set(v_idx[8].tolist())) == 200


def test_diagonal_sums_match_a_loop():
    probs = torch.rand(2, 3, 10)
    pos = torch.tensor([7, 8, 9])
    want = torch.zeros(2, 10)
    for h in range(2):
        for i, p in enumerate(pos.tolist()):
            for key in range(p + 1):
                want[h, p - key] += probs[h, i, key]
    probs = probs.masked_fill(torch.arange(10)[None, None] > pos[None, :, None], 0)
    torch.testing.assert_close(diagonal_sums(probs, pos), want)


def test_last_query_sums_cover_every_query_once():
    q, k = _qk(9, 3, 300, 0, seed=1)
    vertical, _ = last_query_sums((q * 2), (k * 2), 0, 64, 0.1)
    torch.testing.assert_close(vertical.sum(-1), torch.full((9,), 64.0))


def test_last_query_sums_need_keys_ending_at_the_last_query():
    q, k = _qk(q_len=100, prefix=50)
    with pytest.raises(ValueError, match="must end at its last query"):
        last_query_sums(q, k[:, :120], 50, 64)
    with pytest.raises(ValueError, match="q must be"):
        last_query_sums(q, k[..., :32].contiguous(), 50, 64)


def test_block_sparse_mask_is_causal_and_keeps_diagonal():
    q, k = _qk(q_len=200, prefix=100)
    mask = mi.block_sparse_mask(q, k, topk=2, prefix=100)
    assert mask.shape == (9, 4, 5)
    first = 100 + torch.arange(4) * 64
    for r in range(4):
        assert mask[:, r, first[r] // 64].all()  # the diagonal block
        last = min(first[r] + 63, 299)
        assert not mask[:, r, last // 64 + 1:].any()  # nothing after the block's last query
        assert (mask[:, r].sum(-1) <= 2 + 2).all()


@pytest.mark.parametrize("pattern", [mi.HeadPattern("vertical_and_slash", 40, 60),
                                     mi.HeadPattern("block_sparse", 2, 0),
                                     mi.HeadPattern("stream_llm", 16, 64)])
@pytest.mark.parametrize("prefix", [0, 70])
@pytest.mark.parametrize("block_q", [32, 64, 128])
def test_every_pattern_runs_on_the_kernel(pattern, prefix, block_q):
    q, k = _qk(q_len=200, prefix=prefix)
    v = torch.randn_like(k)
    index = mi.layer_index([pattern] * 9, q, k, prefix=prefix, block_q=block_q)
    assert index.block_q == block_q
    # 128-row blocks plus the 100 local diagonals cover all of a 200-token chunk.
    assert 0 < index.density() < 1 or block_q == 128
    got = sparse_prefill_attention(q, k[:, prefix:], v[:, prefix:], k[:, :prefix], v[:, :prefix], index=index)
    want = reference_sparse_prefill_attention(q, k[:, prefix:], v[:, prefix:], k[:, :prefix], v[:, :prefix],
                                              index=index)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mixed_layer_index_keeps_each_heads_pattern():
    q, k = _qk(q_len=200)
    patterns = [mi.HeadPattern("stream_llm", 4, 32)] * 3 + [mi.HeadPattern("vertical_and_slash", 30, 50)] * 6
    index = mi.layer_index(patterns, q, k)
    alone = mi.head_index(patterns[0], q[:1], k[:1])
    torch.testing.assert_close(index.mask()[0], alone.mask()[0])


def test_budgets_at_sequence_length_are_dense():
    q, k = _qk(q_len=150)
    index = mi.layer_index([mi.HeadPattern("vertical_and_slash", 1000, 6096)] * 9, q, k)
    assert index.density() == 1.0


def _config(layers, heads, entry=("vertical_and_slash", 100, 800, 0.9)):
    return [{str(h): list(entry) for h in range(heads)} for _ in range(layers)]


def test_pattern_file_loads_and_fills_missing_heads(tmp_path):
    data = _config(2, 9)
    del data[1]["4"]
    data[0]["2"] = ["stream_llm", 100, 800, 0.5]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    cfg = mi.load_pattern_config(path, num_layers=2, num_heads=9)
    assert cfg[0][2] == mi.HeadPattern("stream_llm", 100, 800)
    assert cfg[1][4] == mi.HeadPattern(*mi.DEFAULT_PATTERN)
    assert cfg[1][0] == mi.HeadPattern("vertical_and_slash", 100, 800)


@pytest.mark.parametrize("layers,heads,needle", [(3, 9, "describes 3 layers, but the model has 2"),
                                                 (2, 12, "names head 11")])
def test_pattern_file_for_another_model_is_rejected(tmp_path, layers, heads, needle):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_config(layers, heads)))
    with pytest.raises(ValueError, match=needle):
        mi.load_pattern_config(path, num_layers=2, num_heads=9)


def test_unknown_pattern_is_rejected(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_config(1, 9, ("magic", 1, 2, 0.0))))
    with pytest.raises(ValueError, match="'magic'"):
        mi.load_pattern_config(path, num_layers=1, num_heads=9)


def test_block_sparse_rows_keep_their_blocks_at_other_query_block_sizes():
    q, k = _qk(q_len=200, prefix=30)
    pattern = mi.HeadPattern("block_sparse", 2, 0)
    at64 = mi.layer_index([pattern] * 9, q, k, prefix=30, block_q=64).mask()
    at32 = mi.layer_index([pattern] * 9, q, k, prefix=30, block_q=32).mask()
    assert torch.equal(at64, at32)


def test_mixed_patterns_share_a_finer_block_size():
    q, k = _qk(q_len=200)
    patterns = ([mi.HeadPattern("block_sparse", 2, 0)] * 3 + [mi.HeadPattern("stream_llm", 4, 32)] * 3
                + [mi.HeadPattern("vertical_and_slash", 30, 50)] * 3)
    assert mi.layer_index(patterns, q, k, block_q=32).block_q == 32
