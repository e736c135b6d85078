"""One SpecTr chain verified in vLLM's own pass (``SpecTrProposer.verify_in_pass``) is lossless.

A Markov target and draft over a small vocabulary stand in for the model: the proposer's pending
chain is what ``propose`` would keep, the target rows are the logits vLLM's pass computes along the
drafted chain, and the bonus is vLLM's sampler's draw after the last draft. Chi-square at the
level of ``test_specdec``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastctx.vllm_plugin.spectr import SpecTrProposer
from tests.test_specdec import LEVEL, V, chi_square_p, markov


def proposer(**knobs) -> SpecTrProposer:
    config = SimpleNamespace(
        additional_config={"fastctx_spectr": {"chains": 1, **knobs}},
        speculative_config=SimpleNamespace(num_speculative_tokens=4, model="x",
                                           num_speculative_tokens_per_batch_size=None),
        model_config=SimpleNamespace(get_vocab_size=lambda: V), scheduler_config=SimpleNamespace(max_num_seqs=8))
    return SpecTrProposer(config)


def two_tokens(d: SpecTrProposer, q_tab, p_tab, depth, scheduled, gen, temperature=1.0):
    """Two tokens after token 0, each step drafting ``depth`` tokens of which vLLM schedules ``scheduled``."""
    out, prev = [], 0
    while len(out) < 2:
        chain = [prev]
        for _ in range(depth):
            chain.append(int(torch.multinomial(p_tab[chain[-1]].float(), 1, generator=gen)))
        drafts = torch.tensor([chain[1:]])
        d.pending["r"] = (drafts, p_tab[torch.tensor(chain[:depth])][None], temperature)
        n = scheduled
        logits = q_tab[torch.tensor(chain[:n])].log()  # the target after the newest token and each draft
        bonus = int(torch.multinomial(q_tab[chain[n]].float(), 1, generator=gen))
        tokens = d.verify_in_pass("r", drafts[0, :n].to(torch.int32), logits.float(), bonus)
        assert tokens[:-1] == chain[1:len(tokens)] and len(tokens) == d.accepted["r"] + 1
        out += tokens
        prev = out[-1]
    return out[:2]


@pytest.mark.parametrize("depth,scheduled", [(1, 1), (3, 3), (3, 2)])
def test_a_chain_verified_in_vllms_pass_generates_the_target_distribution(depth, scheduled):
    q_tab, p_tab = markov(11, 1.5), markov(12, 1.5)
    d, gen = proposer(), torch.Generator().manual_seed(100 + depth * 10 + scheduled)
    n = 5000
    counts = np.zeros(V * V)
    for _ in range(n):
        a, b = two_tokens(d, q_tab, p_tab, depth, scheduled, gen)
        counts[a * V + b] += 1
    joint = (q_tab[0].unsqueeze(1) * q_tab).reshape(-1).numpy()
    assert chi_square_p(counts, joint) > LEVEL
    s = d.summary()
    assert s["steps"] >= n and s["tokens_per_step"] == s["tokens_per_verification"]  # vLLM adds no token


def test_the_lossless_check_rejects_keeping_every_draft():
    """Keeping drafts unverified (the path for chains verified ahead) would follow the draft instead."""
    q_tab, p_tab = markov(11, 1.5), markov(12, 1.5)
    gen = torch.Generator().manual_seed(0)
    counts = np.bincount([int(torch.multinomial(p_tab[0].float(), 1, generator=gen)) for _ in range(3000)],
                         minlength=V)
    assert chi_square_p(counts, q_tab[0].numpy()) < 1e-6


def test_at_temperature_zero_the_argmax_path_is_kept():
    q_tab = markov(11, 1.5)
    d = proposer()
    best = [0]
    for _ in range(3):
        best.append(int(q_tab[best[-1]].argmax()))
    wrong = (best[2] + 1) % V
    d.pending["r"] = (torch.tensor([[best[1], wrong, 0]]), None, 0.0)
    tokens = d.verify_in_pass("r", torch.tensor([best[1], wrong, 0], dtype=torch.int32),
                              q_tab[torch.tensor(best[:3])].log().float(), bonus=4)
    assert tokens == best[1:3] and d.accepted["r"] == 1


def test_drafts_vllm_did_not_take_from_the_proposer_stop_with_the_reason():
    d = proposer()
    d.pending["r"] = (torch.tensor([[1, 2]]), None, 0.0)
    with pytest.raises(RuntimeError, match=r"scheduled drafts \[3\] for request r, not the proposer's \[1, 2\]"):
        d.verify_in_pass("r", torch.tensor([3], dtype=torch.int32), torch.zeros(1, V), bonus=0)
    assert d.verify_in_pass("other", torch.tensor([3], dtype=torch.int32), torch.zeros(1, V), bonus=0) is None
