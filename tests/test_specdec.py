"""K-SEQ and SpecTr chain verification are lossless: outputs follow the target, whatever the draft.

Chi-square tests at a 1e-3 significance level on seeded draws: each rejects a wrong sampler (a
residual off by a few percent, a skewed acceptance) with near certainty at these sample sizes,
and a correct one only by the level's chance, fixed here by the seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastctx.specdec.chains import verify_chains
from fastctx.specdec.kseq import beta, kseq, kseq_greedy, kseq_reference, optimal_rho, output_distribution, sample

LEVEL = 1e-3


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """P-value of observed counts against expected probabilities (cells expected < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def random_pair(gen: torch.Generator, vocab: int, sharp: float = 2.0):
    p = torch.softmax(sharp * torch.randn(vocab, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(sharp * torch.randn(vocab, generator=gen, dtype=torch.float64), -1)
    return p, q


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_kseq_outputs_follow_the_target(k, seed):
    gen = torch.Generator().manual_seed(seed)
    p, q = random_pair(gen, 12)
    n = 60000
    drafts = torch.multinomial(p.expand(n, -1).float(), k, replacement=True, generator=gen)
    tok, first = kseq(p.expand(n, -1), q.expand(n, -1), drafts, gen)
    counts = np.bincount(tok.numpy(), minlength=12)
    assert chi_square_p(counts, q.numpy()) > LEVEL
    # The acceptance the paper derives: P_acc = 1 - (1 - beta(rho*))^k.
    rho = optimal_rho(p, q, k)
    p_acc = 1 - (1 - float(beta(p, q, rho))) ** k
    accepted = int((first >= 0).sum())
    assert chi_square_p(np.array([accepted, n - accepted]), np.array([p_acc, 1 - p_acc])) > LEVEL


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_zeros():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(12, generator=gen, dtype=torch.float64), -1)
    probs[[0, 5, 11]] = 0  # unnormalized rows, zeros first, inside and last
    tok = sample(probs.expand(40000, -1) * 3, gen)
    counts = np.bincount(tok.numpy(), minlength=12)
    assert counts[[0, 5, 11]].sum() == 0
    assert chi_square_p(counts, (probs / probs.sum()).numpy()) > LEVEL
    assert sample(torch.tensor([0.0, 0.0, 1.0]), gen).shape == ()


def test_the_chi_square_check_rejects_a_sampler_that_is_not_lossless():
    """Naive multi-draft: each of 4 drafts gets plain speculative sampling's rule (rho = 1) and the
    plain residual; accepting from several drafts that way leans the output toward the draft."""
    gen = torch.Generator().manual_seed(0)
    p, q = random_pair(gen, 12)
    n, k = 60000, 4
    drafts = torch.multinomial(p.expand(n, -1).float(), k, replacement=True, generator=gen)
    ok = torch.rand(n, k, generator=gen, dtype=torch.float64) <= (q[drafts] / p[drafts]).clamp(max=1)
    res = (q - p).clamp_min(0)
    fallback = torch.multinomial((res / res.sum()).expand(n, -1).float(), 1, generator=gen)[:, 0]
    first = ok.int().argmax(-1)
    tok = torch.where(ok.any(-1), drafts.gather(1, first.unsqueeze(1))[:, 0], fallback)
    assert chi_square_p(np.bincount(tok.numpy(), minlength=12), q.numpy()) < 1e-6


def test_one_draft_is_standard_speculative_sampling():
    gen = torch.Generator().manual_seed(3)
    p, q = random_pair(gen, 20)
    assert float(optimal_rho(p, q, 1)) == 1.0
    n = 40000
    drafts = torch.multinomial(p.expand(n, -1).float(), 1, replacement=True, generator=gen)
    _, first = kseq(p.expand(n, -1), q.expand(n, -1), drafts, gen)
    one_minus_tv = float(torch.minimum(p, q).sum())
    accepted = int((first >= 0).sum())
    assert chi_square_p(np.array([accepted, n - accepted]), np.array([one_minus_tv, 1 - one_minus_tv])) > LEVEL


def test_rho_star_is_the_smallest_valid_rho_and_more_drafts_accept_more():
    gen = torch.Generator().manual_seed(5)
    pairs = [random_pair(gen, 30, sharp) for sharp in (0.5, 1.0, 2.0, 4.0) for _ in range(5)]
    p = torch.stack([a for a, _ in pairs])
    q = torch.stack([b for _, b in pairs])
    last = None
    for k in (1, 2, 3, 5, 8):
        rho = optimal_rho(p, q, k)
        assert bool(((rho >= 1) & (rho <= k)).all())
        for i in range(len(pairs)):
            out = output_distribution(p[i].numpy(), q[i].numpy(), k, float(rho[i]))
            np.testing.assert_allclose(out, q[i].numpy(), atol=1e-9)
            if rho[i] > 1 + 1e-6:  # a smaller rho would make the residual negative somewhere
                smaller = float(rho[i]) * (1 - 1e-4)
                b = float(torch.minimum(p[i], q[i] / smaller).sum())
                assert 1 - (1 - b) ** k > smaller * b
        acc = 1 - (1 - beta(p, q, rho)) ** k
        if last is not None:
            assert bool((acc >= last - 1e-12).all())
        last = acc


def test_the_reference_agrees_with_the_batched_version():
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    p, q = random_pair(gen, 8)
    n, k = 6000, 3
    drafts = rng.choice(8, size=(n, k), p=p.numpy())
    ref = [kseq_reference(p.numpy(), q.numpy(), list(d), rng) for d in drafts]
    counts = np.bincount([t for t, _ in ref], minlength=8)
    assert chi_square_p(counts, q.numpy()) > LEVEL
    ref_acc = sum(i >= 0 for _, i in ref) / n
    _, first = kseq(p.expand(n, -1), q.expand(n, -1), torch.from_numpy(drafts), gen)
    assert abs(ref_acc - float((first >= 0).double().mean())) < 0.03


def test_greedy_takes_the_argmax_from_the_first_matching_draft():
    q = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    tok, first = kseq_greedy(q, torch.tensor([[2, 1, 1], [1, 2, 1]]))
    assert tok.tolist() == [1, 0] and first.tolist() == [1, -1]


# ---- chains: a Markov target and draft over a small vocabulary --------------------------------

V = 5


def markov(seed: int, sharp: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, V, generator=gen, dtype=torch.float64), -1)


def spectr_two_tokens(q_tab, p_tab, k, depth, gen, greedy=False):
    """Generate two tokens after token 0 with SpecTr steps, drafts drawn from the Markov draft."""
    out: list[int] = []
    prev = 0
    while len(out) < 2:
        drafts = torch.empty(k, depth, dtype=torch.long)
        last = torch.full((k,), prev)
        for t in range(depth):
            drafts[:, t] = torch.multinomial(p_tab[last].float(), 1, generator=gen)[:, 0]
            last = drafts[:, t]
        before = torch.cat([torch.full((k, 1), prev), drafts], 1)
        p = None if greedy else p_tab[before[:, :depth]]
        q = q_tab[before]
        if greedy:
            q = torch.nn.functional.one_hot(q.argmax(-1), V).double()
        verdict = verify_chains(drafts, p, q, gen)
        assert verdict.tokens[:-1] == drafts[verdict.chain, :verdict.accepted].tolist()
        out += verdict.tokens
        prev = out[-1]
    return out[:2]


@pytest.mark.parametrize("k,depth", [(1, 2), (2, 2), (4, 3)])
def test_spectr_chains_generate_the_target_sequence_distribution(k, depth):
    q_tab, p_tab = markov(11, 1.5), markov(12, 1.5)
    gen = torch.Generator().manual_seed(k * 10 + depth)
    n = 5000
    counts = np.zeros(V * V)
    for _ in range(n):
        a, b = spectr_two_tokens(q_tab, p_tab, k, depth, gen)
        counts[a * V + b] += 1
    joint = (q_tab[0].unsqueeze(1) * q_tab).reshape(-1).numpy()
    assert chi_square_p(counts, joint) > LEVEL


def test_spectr_chains_at_temperature_zero_follow_the_argmax_path():
    q_tab, p_tab = markov(21, 1.0), markov(22, 1.0)
    gen = torch.Generator().manual_seed(0)
    want = [int(q_tab[0].argmax())]
    want.append(int(q_tab[want[0]].argmax()))
    for _ in range(50):
        assert spectr_two_tokens(q_tab, p_tab, 3, 2, gen, greedy=True) == want


def test_more_chains_accept_longer_prefixes():
    q_tab, p_tab = markov(31, 1.5), markov(32, 1.5)
    gen = torch.Generator().manual_seed(1)
    mean = {}
    for k in (1, 4):
        lengths = []
        for _ in range(1500):
            drafts = torch.empty(k, 4, dtype=torch.long)
            last = torch.zeros(k, dtype=torch.long)
            for t in range(4):
                drafts[:, t] = torch.multinomial(p_tab[last].float(), 1, generator=gen)[:, 0]
                last = drafts[:, t]
            before = torch.cat([torch.zeros(k, 1, dtype=torch.long), drafts], 1)
            lengths.append(verify_chains(drafts, p_tab[before[:, :4]], q_tab[before], gen).accepted)
        mean[k] = np.mean(lengths)
    assert mean[4] > 1.2 * mean[1], mean


# ---- the target's distributions along k chains, on a small decoder stack --------------------------

def test_score_chains_equals_a_full_forward_of_each_chain():
    from fastctx.specdec.score import Chains, score_batch, score_chains
    from tests.test_cacheblend import ToyStack

    class Scoring(ToyStack):
        def logits(self, hidden, residual):
            return (hidden + residual) @ self.emb.T

    stack = Scoring(seed=3)

    def full_forward(ids):
        """Every layer over the whole sequence with causal attention: the plain definition."""
        pos = torch.arange(len(ids))
        hidden, residual = stack.embed(torch.tensor(ids)), None
        H, KH, D = stack.num_heads, stack.num_kv_heads, stack.head_dim

        def attend(q, k, v):
            q, k, v = (t.view(len(ids), -1, D).transpose(0, 1) for t in (q, k, v))
            k, v = k.repeat_interleave(H // KH, 0), v.repeat_interleave(H // KH, 0)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=stack.scale)
            return out.transpose(0, 1).reshape(len(ids), -1)

        kv = []
        for layer in range(stack.num_layers):
            def keep(q, k, v, layer=layer):
                kv.append((k, v))
                return attend(q, k, v)
            hidden, residual = stack.run_layer(layer, pos, hidden, residual, keep)
        return stack.logits(hidden, residual), kv

    context = [5, 9, 1, 33, 7, 2, 40, 11]
    drafts = torch.tensor([[3, 4, 5], [3, 8, 1], [20, 21, 22]])
    _, kv = full_forward(context[:-1])
    got = score_chains(stack, context[-1], drafts, len(context) - 1, lambda layer: kv[layer])
    for c in range(3):
        want, _ = full_forward(context + drafts[c].tolist())
        # The kernel computes in float32.
        torch.testing.assert_close(got[c], want[len(context) - 1:], atol=1e-4, rtol=1e-4)
    # No prefix: the chains start the sequence.
    got = score_chains(stack, 5, drafts, 0, None)
    torch.testing.assert_close(got[1], full_forward([5, 3, 8, 1])[0], atol=1e-4, rtol=1e-4)
    # Several requests in one pass (other prefixes, chain counts and depths) score as each alone.
    other = [(7 * i) % 50 for i in range(38)]  # over two whole blocks of the scoring buffer
    _, kv2 = full_forward(other[:-1])
    batch = [Chains(context[-1], drafts, len(context) - 1, lambda layer: kv[layer]),
             Chains(other[-1], torch.tensor([[6], [9]]), len(other) - 1, lambda layer: kv2[layer]),
             Chains(5, drafts[:1], 0)]
    together = score_batch(stack, batch)
    for item, got in zip(batch, together):
        alone = score_chains(stack, item.last_token, item.drafts, item.start, item.prefix)
        torch.testing.assert_close(got, alone, atol=1e-6, rtol=1e-6)
    for c, d in enumerate([[6], [9]]):
        torch.testing.assert_close(together[1][c], full_forward(other + d)[0][len(other) - 1:], atol=1e-4, rtol=1e-4)


def test_chain_tree_layout_parents_rows_and_paths():
    """Node 0 is the root; each chain's nodes follow it in order, each marking its chain's earlier
    tokens and the root; a chain's K-SEQ rows are the root then its nodes."""
    from fastctx.specdec.tree import accepted_path, chain_rows, chain_tree, tree_size

    chains, depth = 3, 4
    tree, rows = chain_tree(chains, depth), chain_rows(chains, depth)
    assert tree.shape == (tree_size(chains, depth),) * 2 == (13, 13)
    assert bool(tree.diagonal().all()) and not bool(tree.triu(1).any())
    for c in range(chains):
        path = accepted_path(c, depth, depth)
        assert rows[c].tolist() == path
        for t in range(1, depth + 1):  # each node marks exactly the path up to it
            assert tree[path[t]].nonzero().flatten().tolist() == path[:t + 1]
    assert accepted_path(1, 0, depth) == [0]


def test_restrict_cuts_as_sglangs_sampler():
    """Top-k by rank, top-p on the mass of the more likely tokens, min-p against the most likely;
    the rest renormalized, in the vocabulary's own order."""
    from fastctx.specdec.kseq import restrict

    def row(*values):
        return torch.tensor([values], dtype=torch.float64)

    probs = row(0.05, 0.5, 0.15, 0.3)
    assert torch.equal(restrict(probs, 4, 1.0, 0.0), probs)
    torch.testing.assert_close(restrict(probs, 2, 1.0, 0.0), row(0, 0.625, 0, 0.375))
    # before each token: 0.5, 0, 0.8, 0.95 of mass; the token whose predecessors hold more than 0.7 goes
    torch.testing.assert_close(restrict(probs, 4, 0.7, 0.0), row(0, 0.625, 0, 0.375))
    torch.testing.assert_close(restrict(probs, 4, 0.9, 0.0), row(0, 0.5, 0.15, 0.3) / 0.95)
    torch.testing.assert_close(restrict(probs, 4, 1.0, 0.5), row(0, 0.5, 0, 0.3) / 0.8)


def test_spectr_knobs_are_validated_with_what_to_change():
    from fastctx.methods.base import KnobError
    from fastctx.specdec.params import SpecTrParams

    assert SpecTrParams.from_dict({}).chains == 4
    assert SpecTrParams.from_dict({"chains": 2, "ngram_interpolation": 1}).chains == 2
    for raw, message in (({"chain": 2}, "unknown key"), ({"chains": 0}, "give 1-16 chains"),
                         ({"ngram_min": 3, "ngram_max": 2}, "1 <= ngram_min <= ngram_max"),
                         ({"ngram_interpolation": 0}, r"\(0, 1\]"), ([2], "JSON object")):
        with pytest.raises(KnobError, match=message):
            SpecTrParams.from_dict(raw)


def test_sglang_spectr_knobs_come_from_the_flag():
    from fastctx.methods.base import KnobError
    from fastctx.sglang_plugin.settings import spectr_params

    assert spectr_params('{"chains": 2}').chains == 2
    assert spectr_params('{"scylla": true}').scylla
    with pytest.raises(KnobError, match="not JSON"):
        spectr_params("{chains: 2}")


def test_scylla_within_a_fixed_draft_tree_picks_only_arms_that_fit():
    """SGLang's tree has a fixed number of draft nodes: every arm Scylla picks fits it."""
    from fastctx.specdec.scylla import ScyllaPolicy

    policy = ScyllaPolicy(depths=tuple(range(1, 9)), chains=(1, 2, 4), max_drafts=8, explore=0.5, seed=1)
    picked = set()
    for step in range(300):
        depth, k = policy.choose(2)
        picked.add((depth, k))
        policy.observe(depth, k, 2, [min(depth, step % 3)] * 2, 0.01 * (1 + depth * k / 8))
    assert all(depth * k <= 8 for depth, k in picked) and len(picked) > 2
    with pytest.raises(ValueError, match="max_drafts=1"):
        ScyllaPolicy(depths=(2, 3), chains=(1,), max_drafts=1)
