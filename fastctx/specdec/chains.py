"""SpecTr's multi-token verification over k draft chains of one request.

At depth t the chains whose first t tokens equal the accepted prefix are i.i.d. samples of
``p(.|prefix)``; K-SEQ runs among them (k_t = their number, rho* for k_t). An accepted token keeps
the chains that drew it; a residual draw ends the step. When every depth is accepted, a bonus
token comes from the target after the last one. With k = 1 this is standard speculative sampling
over one chain; at temperature 0 it accepts the longest chain prefix equal to the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastctx.specdec.kseq import kseq, kseq_greedy, sample


@dataclass
class Verdict:
    tokens: list[int]  # accepted draft tokens, then one token drawn from the target (residual or bonus)
    chain: int  # a chain that holds the accepted draft tokens (its KV can be kept)

    @property
    def accepted(self) -> int:
        return len(self.tokens) - 1


def verify_chains(drafts: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor,
                  generator: torch.Generator | None = None) -> Verdict:
    """``drafts`` ``[k, L]`` token ids; ``p`` ``[k, L, V]``: the draft distribution each token was
    drawn from (None at temperature 0); ``q`` ``[k, L + 1, V]``: the target's distribution after
    each chain prefix (position L is the bonus)."""
    k, depth = drafts.shape
    alive = torch.arange(k)
    tokens: list[int] = []
    for t in range(depth):
        lead = alive[0]  # the candidates share their prefix, so their p and q rows are the same
        cand = drafts[alive, t]
        if p is None:
            tok, first = kseq_greedy(q[lead, t], cand)
        else:
            tok, first = kseq(p[lead, t], q[lead, t], cand, generator)
        tokens.append(int(tok))
        if int(first) < 0:
            return Verdict(tokens, int(lead))
        alive = alive[cand == tok]
    lead = alive[0]
    last = q[lead, depth]
    bonus = last.argmax() if p is None else sample(last, generator)
    tokens.append(int(bonus))
    return Verdict(tokens, int(lead))
