"""CacheBlend's fusion against a small decoder stack (plain torch, RoPE, GQA), no engine."""

import pytest
import torch

from fastctx.cacheblend.blend import StoredSpan, blend
from fastctx.cacheblend.chunks import ChunkSpanError, chunk_lead, spans_from_request, split_on_separator
from fastctx.cacheblend.params import BlendParams
from fastctx.methods.base import KnobError


class ToyStack:
    """A Llama-shaped decoder: RMS-free for brevity, rotate-half RoPE, 4 query heads over 2 KV heads."""

    num_layers, num_heads, num_kv_heads, head_dim, dtype = 4, 4, 2, 8, torch.float64

    def __init__(self, seed=0, vocab=50):
        g = torch.Generator().manual_seed(seed)
        H, KH, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.hidden = 16
        self.scale = D ** -0.5
        self.emb = torch.randn(vocab, self.hidden, generator=g, dtype=self.dtype)
        self.w = [{n: torch.randn(self.hidden, m, generator=g, dtype=self.dtype) / self.hidden ** 0.5
                   for n, m in (("q", H * D), ("k", KH * D), ("v", KH * D), ("mlp", self.hidden))}
                  | {"o": torch.randn(H * D, self.hidden, generator=g, dtype=self.dtype) / (H * D) ** 0.5}
                  for _ in range(self.num_layers)]

    def rope(self, x, pos):
        D = self.head_dim
        x = x.view(x.shape[0], -1, D)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=self.dtype) / D))
        ang = pos.to(self.dtype)[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return (x * cos + rot * sin).flatten(1)

    def embed(self, ids):
        return self.emb[ids]

    def run_layer(self, layer, positions, hidden, residual, attend):
        w = self.w[layer]
        x = hidden if residual is None else hidden + residual
        q, k, v = self.rope(x @ w["q"], positions), self.rope(x @ w["k"], positions), x @ w["v"]
        h = attend(q, k, v) @ w["o"] + x
        return torch.tanh(h @ w["mlp"]), h

    def rotate_keys(self, layer, keys, shift):
        return self.rope(keys, shift)


def full_kv(stack, ids):
    r = blend(stack, torch.tensor(ids), 0, [], 1.0, 1)
    return torch.stack([r.keys, r.values], 1)


def chunked(stack, chunks, sep, ratio, check=1):
    """The blend of [c0 sep c1 sep ...] with every chunk's KV stored from its own prefill."""
    ids, stored = [], []
    for c in chunks:
        stored.append(StoredSpan(len(ids), len(c), full_kv(stack, c)))
        ids += c + sep
    return ids, blend(stack, torch.tensor(ids), 0, stored, ratio, check)


def test_ratio_one_is_a_full_prefill():
    s = ToyStack()
    chunks = [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]
    ids, r = chunked(s, chunks, [49], 1.0)
    ref = full_kv(s, ids)
    torch.testing.assert_close(r.keys, ref[:, 0])
    torch.testing.assert_close(r.values, ref[:, 1])
    assert r.recomputed == r.reused == 15 and r.computed == 3


def test_ratio_zero_reuses_every_stored_token_moved_to_its_position():
    s = ToyStack()
    chunks = [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    ids, r = chunked(s, chunks, [49], 0.0)
    assert r.recomputed == 0 and r.reused == 9 and r.computed == 2
    alone = full_kv(s, chunks[1])
    # Stored values are reused as they are; keys (stored at 0..3) are rotated 6 positions on, to 6..9.
    torch.testing.assert_close(r.values[:, 6:10], alone[:, 1])
    torch.testing.assert_close(r.keys[:, 6:10], s.rope(alone[:, 0].reshape(-1, 16), torch.full((16,), 6))
                               .view(4, 4, 16))
    # Layer 0 K depends on the token and its position only: moving it equals computing it there.
    torch.testing.assert_close(r.keys[0], full_kv(s, ids)[0, 0])


def test_partial_ratio_recomputes_the_most_deviating_tokens_and_moves_toward_full():
    s = ToyStack()
    chunks = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22, 23, 24]]
    ids, r0 = chunked(s, chunks, [49], 0.0)
    _, r5 = chunked(s, chunks, [49], 0.5)
    ref = full_kv(s, ids)
    assert r5.recomputed == 12 and r5.selected.numel() == 12
    # The first chunk starts the prompt: alone it is exact, so it deviates least and is not picked.
    assert not (r5.selected < 8).any()
    err = lambda r: (r.values[-1] - ref[-1, 1]).abs().sum()
    assert err(r5) < err(r0)


def test_prefix_from_the_engine_cache():
    s = ToyStack()
    ids = list(range(1, 21))
    ref = full_kv(s, ids)
    pre = lambda layer: (ref[layer, 0, :8], ref[layer, 1, :8])
    r = blend(s, torch.tensor(ids[8:]), 8, [], 1.0, 1, prefix=pre)
    torch.testing.assert_close(r.keys, ref[:, 0, 8:])


def test_a_stored_span_may_start_inside_a_chunk():
    s = ToyStack()
    chunk = [5, 6, 7, 8, 9, 10]
    alone = full_kv(s, chunk)
    r = blend(s, torch.tensor(chunk[2:]), 2, [StoredSpan(0, 4, alone, skip=2)], 0.0, 1,
              prefix=lambda layer: (alone[layer, 0, :2], alone[layer, 1, :2]))
    torch.testing.assert_close(r.keys, alone[:, 0, 2:])
    assert r.computed == 0 and r.recomputed == 0


def test_separator_split_and_request_spans():
    assert split_on_separator([1, 2, 9, 9, 3, 4, 5, 9, 9, 6], [9, 9], 2) == [(0, 2), (4, 7)]
    assert split_on_separator([1, 9, 9, 3, 4], [9, 9], 2) == []
    assert spans_from_request([[0, 4], [5, 6], [6, 9]], 10, 2) == [(0, 4), (6, 9)]
    for bad in ([[3, 2]], [[0, 11]], [[0, 4], [3, 5]], "0:4", [[0, 1.5]]):
        with pytest.raises(ChunkSpanError):
            spans_from_request(bad, 10, 1)


def test_a_chunk_is_stored_after_the_separator_or_after_the_prompt_head():
    sep = [9, 9]
    ids = [1, 2, 3, 9, 9, 4, 5, 6, 9, 9, 7, 8, 9, 9, 0]  # head, two chunks, question
    spans = split_on_separator(ids, sep, 2)
    assert spans == [(0, 3), (5, 8), (10, 12)]
    assert chunk_lead(ids, spans, sep, "separator") == sep
    # The head opens the prompt and is a chunk itself: the lead runs to the first chunk after it.
    assert chunk_lead(ids, spans, sep, "prompt_head") == [1, 2, 3, 9, 9]
    short_head = [1, 9, 9, 4, 5, 6, 9, 9, 0]
    assert chunk_lead(short_head, split_on_separator(short_head, sep, 2), sep, "prompt_head") == [1, 9, 9]
    # Nothing before the first chunk to stand in for a head: the separator.
    assert chunk_lead([4, 5, 9, 9, 0], [(0, 2)], sep, "prompt_head") == sep


def test_params_say_what_to_change():
    assert BlendParams().recompute_ratio == 0.15 and BlendParams().check_layer == 1
    with pytest.raises(KnobError, match=r"recompute_ratio=1.5.*\[0, 1\]"):
        BlendParams(recompute_ratio=1.5)
    with pytest.raises(KnobError, match="unknown key 'ratio'.*recompute_ratio"):
        BlendParams.from_dict({"ratio": 0.2})
    with pytest.raises(KnobError, match="local_cpu_gb=0.*CPU pool"):
        BlendParams(local_cpu_gb=0)
    with pytest.raises(KnobError, match="remote_url"):
        BlendParams(remote_url="localhost:6379")
    with pytest.raises(KnobError, match='chunk_context=.system.: use "separator" or "prompt_head"'):
        BlendParams(chunk_context="system")
