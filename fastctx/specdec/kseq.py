"""K-SEQ: SpecTr's draft selection for k i.i.d. drafts of one position (Sun et al., NeurIPS 2023).

Draft distribution ``p``, target ``q`` over a vocabulary; k drafts ``X_i ~ p``. With
``beta(rho) = sum_x min(p(x), q(x) / rho)`` and ``P_acc = 1 - (1 - beta)^k``, ``rho*`` is the
smallest rho in [1, k] with ``P_acc <= rho * beta`` (the residual below stays non-negative).
Draft i is accepted with probability ``min(1, q(X_i) / (rho* p(X_i)))``, the first accepted one
wins; when none is, the output is drawn from the residual
``(q - min(p, q / rho*) * P_acc / beta) / (1 - P_acc)``. The output is distributed exactly as
``q``; k = 1 gives rho* = 1, standard speculative sampling.

Everything is batched over leading dimensions: ``p``, ``q`` are ``[..., V]`` and drafts
``[..., k]``. ``kseq_reference`` is the one-position NumPy version the tests hold this to.
"""

from __future__ import annotations

import numpy as np
import torch

BISECTION_STEPS = 20  # the valid end is kept, so fewer steps cost acceptance (< 1e-5 of rho), never exactness


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The target distribution drafts are verified against (float64): softmax at ``temperature``,
    or the argmax as a one-hot at temperature 0 (greedy, K-SEQ's special case)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return torch.softmax(logits.double() / temperature, -1)


def restrict(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """``probs`` ``[..., V]`` cut as SGLang's sampler cuts them, renormalized: tokens ranked ``top_k``
    or lower dropped, then those whose more likely tokens already hold ``top_p``, then those below
    ``min_p`` times the most likely (top_k >= V, top_p = 1, min_p = 0: unchanged). K-SEQ against the
    result keeps the engine's sampling distribution."""
    if top_k >= probs.shape[-1] and top_p >= 1 and min_p <= 0:
        return probs
    ranked, order = probs.sort(-1, descending=True)
    before = ranked.cumsum(-1) - ranked
    drop = (torch.arange(ranked.shape[-1]) >= top_k) | (before > top_p) | (ranked < min_p * ranked[..., :1])
    kept = torch.zeros_like(probs).scatter(-1, order, ranked.masked_fill(drop, 0.0))
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` ``[..., V]`` (rows need not be normalized), by inverse CDF in
    float64: ``torch.multinomial`` costs ~1 ms per row over a 49K vocabulary on a CPU, where a draft
    step samples depth x k rows per request."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand((*probs.shape[:-1], 1), dtype=torch.float64, generator=generator, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def beta(p: torch.Tensor, q: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    return torch.minimum(p, q / rho.unsqueeze(-1)).sum(-1)


def acceptance(b: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    return 1 - (1 - b).clamp_min(0) ** k


def optimal_rho(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """rho* per position: rho * beta(rho) grows and P_acc(rho) falls with rho, so bisection finds
    the root of their difference; rho = k always satisfies the condition."""
    lo = torch.ones(p.shape[:-1], dtype=torch.float64, device=p.device)
    if k == 1:
        return lo
    p64, q64 = _on_support(p.double(), q.double())
    hi = torch.full_like(lo, float(k))
    b1 = beta(p64, q64, lo)
    ok = lo * b1 >= acceptance(b1, k)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        b = beta(p64, q64, mid)
        good = mid * b >= acceptance(b, k)
        hi = torch.where(good, mid, hi)
        lo = torch.where(good, lo, mid)
    return torch.where(ok, torch.ones_like(hi), hi)


def _on_support(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """beta only sums where p > 0: a sparse draft (n-gram) bisects over its support, not the vocabulary."""
    nnz = int((p > 0).sum(-1).max())
    if nnz * 4 >= p.shape[-1]:
        return p, q
    idx = p.topk(max(nnz, 1), -1).indices
    return p.gather(-1, idx), q.gather(-1, idx)


def residual(p: torch.Tensor, q: torch.Tensor, rho: torch.Tensor, k: int) -> torch.Tensor:
    """The distribution to draw from when every draft is rejected (rows sum to 1)."""
    p64, q64 = p.double(), q.double()
    b = beta(p64, q64, rho)
    scale = acceptance(b, k) / b.clamp_min(1e-300)
    res = (q64 - torch.minimum(p64, q64 / rho.unsqueeze(-1)) * scale.unsqueeze(-1)).clamp_min(0)
    total = res.sum(-1, keepdim=True)
    # Where every draft is accepted with certainty the residual is never used; keep it a distribution.
    return torch.where(total > 1e-12, res / total.clamp_min(1e-300), q64)


def kseq(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One K-SEQ selection per position. Returns ``(token, accepted)``: the output token ``[...]``
    and the index of the accepted draft, or -1 where the residual was drawn."""
    k = drafts.shape[-1]
    rho = optimal_rho(p, q, k)
    pd = p.double().gather(-1, drafts)
    qd = q.double().gather(-1, drafts)
    ratio = torch.where(pd > 0, qd / (rho.unsqueeze(-1) * pd.clamp_min(1e-300)), torch.ones_like(pd))
    u = torch.rand(drafts.shape, dtype=torch.float64, generator=generator, device=p.device)
    ok = u <= ratio
    first = torch.where(ok.any(-1), ok.int().argmax(-1), torch.full_like(rho, -1, dtype=torch.long))
    token = drafts.gather(-1, first.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    miss = first < 0
    if miss.any():  # the residual only where every draft was rejected
        res = residual(p[miss], q[miss], rho[miss], k)
        token[miss] = sample(res, generator).to(token.dtype)
    return token, first


def kseq_greedy(q: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: the target's argmax, accepted from the first draft that equals it."""
    best = q.argmax(-1)
    hit = drafts == best.unsqueeze(-1)
    first = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(best, -1))
    return best, first


def kseq_reference(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator) -> tuple[int, int]:
    """One position, written as the paper states it (a scan for rho* instead of bisection)."""
    k = len(drafts)

    def beta_(rho):
        return float(np.minimum(p, q / rho).sum())

    def valid(rho):
        b = beta_(rho)
        return 1 - (1 - b) ** k <= rho * b + 1e-12

    rho = 1.0
    if not valid(1.0):
        lo, hi = 1.0, float(k)
        while hi - lo > 1e-12:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if valid(mid) else (mid, hi)
        rho = hi
    for i, x in enumerate(drafts):
        if rng.random() <= min(1.0, q[x] / (rho * p[x])):
            return x, i
    b = beta_(rho)
    p_acc = 1 - (1 - b) ** k
    res = np.maximum(q - np.minimum(p, q / rho) * p_acc / b, 0)
    return int(rng.choice(len(q), p=res / res.sum())), -1


def output_distribution(p: np.ndarray, q: np.ndarray, k: int, rho: float) -> np.ndarray:
    """What K-SEQ outputs, in closed form (drafts i.i.d. from p): equals q when rho is valid."""
    b = float(np.minimum(p, q / rho).sum())
    p_acc = 1 - (1 - b) ** k
    res = np.maximum(q - np.minimum(p, q / rho) * p_acc / b, 0)
    return np.minimum(p, q / rho) * p_acc / b + (1 - p_acc) * res / max(res.sum(), 1e-300)
