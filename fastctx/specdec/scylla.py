"""Scylla's speculation policy: the number of draft tokens (and chains) from acceptance laws fitted
online, chosen per step to maximise expected tokens per second.

Scylla (Yan et al. 2025) finds draft acceptance log-linear in draft capacity, pretraining tokens and
batch size. For one deployed draft the free variables are the chain count k, the batch size b and
the depth t, so the law fitted here is

    P(token at depth t accepted | depth t - 1 accepted) = clip(th0 + th1 ln k + th2 ln b + th3 ln t + th4 c)

by ridge least squares over exponentially forgotten observations. ``c`` is 1 for a request that is
copying (its newest token was the one its draft expected most), else 0: acceptance runs in
streaks (an n-gram draft on copy prompts: one chain accepts 0.64 after a position it likely
accepted, 0.20 otherwise), which batch size and depth alone cannot see. An engine that has no
such signal passes none, and th4 stays 0.

An arm (a ``Plan``) gives a depth to the step's requests that are copying and one, no deeper, to
the others, and a chain count to both: one depth for a whole batch drafts deep for every request
where a few copy, or shallow for the ones that do. A step's time is the mean of the steps seen with
the same draft tokens over the step's requests, chains and batch size, forgotten with every step
the policy takes (so an arm timed long ago, or on a host that has since sped up or slowed down, is
known less well), averaged with the linear fit ``T = c0 + c1 * target_tokens + c2 * deepest_draft
+ c3 * draft_tokens + s * [k >= 2] + v * [any draft]`` over every step (s: what two or more chains
cost beyond their tokens, in vLLM a scoring pass of fastctx's before the engine's; v: the engine's
verification once anything is drafted). The fit counts as the steps its other keys are worth at
that point (``OnlineLeastSquares.support``): a batch size's pair of depths seen a few times, or
long ago, is timed mostly by its neighbours, while a key the fit places by its own steps alone (no
drafts) keeps its own mean; a combination not seen yet is timed by the fit. A request drafting depth g
with k chains yields ``1 + sum_{t<=g} prod_{j<=t} a(k, b, j, c)`` tokens in expectation by the law;
where the (g, k) has run at this batch size, that prediction is averaged with the tokens its
requests in the same state got, the law counting as ``PRIOR_REQUESTS`` of them, so an arm run
often is ranked by what it yielded (the law, fitted over every arm, predicted the deep arms of an
n-gram draft ~10-20% high on the default model) and one seen little by the law. The policy picks
the arm with most tokens per second. Depth 0 (no speculation) is an arm too: where drafting costs
more than it saves, the policy stops speculating.

No arm is run just to be tried: per batch size the policy first runs no speculation and the cheapest
speculation (the smallest depth, one chain), then picks by Thompson sampling: each step it draws the
acceptance law's coefficients from the fit's Gaussian posterior, each run arm's tokens per request
and step time from their means' (their spread and how much weight is left), and runs the arm with
most tokens per second under that draw, among the arms already timed at this batch size and the
neighbours of the fit's best arm (each state's depth one up, down or the same, or twice or half the
chains). What was seen on few steps (a new batch size, a few unlucky drafts) keeps being tried; what
was seen on many settles on the best. With probability ``explore / (1 + n / 20)`` (n: steps so far
at that batch size) it runs a neighbour instead, so arms not timed yet get timed (``explore=0``: the
fit's best arm, no sampling). An arm that would be slower than the best arm even with its tokens two
standard errors above what it yielded (every draft accepted, where it has not run) and its step two
standard errors quicker than its mean is not tried. A neighbour of the best arm last timed longer
ago than the policy remembers (``1 / (1 - decay)`` steps) is timed again if it would win at half its
step time: a timing that was unlucky (the host busy) is not kept forever. A deep, many-chain arm
can cost dozens of plain steps, so trying every arm, or exploring uniformly, would cost more than
the choice gains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class OnlineLeastSquares:
    """Ridge regression over observations weighted by ``decay ** age``."""

    def __init__(self, prior: list[float], decay: float, ridge: float = 1.0):
        n = len(prior)
        self.decay = decay
        self.prior = np.asarray(prior, dtype=np.float64)
        self.ridge = ridge
        self.xtx = np.zeros((n, n))
        self.xty = np.zeros(n)
        self.seen = 0
        self._coef = None  # solved once per change: a policy's choice reads it for every arm and depth
        self._coef_list = None
        self._inverse = None

    def add(self, rows: np.ndarray, targets: np.ndarray) -> None:
        self.xtx *= self.decay
        self.xty *= self.decay
        self.xtx += rows.T @ rows
        self.xty += rows.T @ targets
        self.seen += len(targets)
        self._coef = self._coef_list = self._inverse = None

    def sample(self, rng: np.random.Generator, variance: float) -> np.ndarray:
        """Coefficients drawn from the fit's Gaussian posterior (noise ``variance`` per observation)."""
        return rng.multivariate_normal(self.coef(), variance * self._inverse_gram(), method="cholesky")

    def support(self, row: list[float]) -> float:
        """How many observations the fit's prediction at ``row`` is worth: the noise variance over the
        prediction's (``1 / row' A^-1 row``); few where the rows seen say little about it."""
        x = np.asarray(row)
        return 1.0 / max(float(x @ self._inverse_gram() @ x), 1e-12)

    def _inverse_gram(self) -> np.ndarray:
        """``A^-1``, ``A = X'WX + ridge I``: the posterior covariance per unit noise variance."""
        if self._inverse is None:
            self._inverse = np.linalg.inv(self.xtx + self.ridge * np.eye(len(self.prior)))
        return self._inverse

    def coef(self) -> np.ndarray:
        if self._coef is None:
            # Shrunk toward the prior, so a law seen on few arms stays near it off those arms.
            a = self.xtx + self.ridge * np.eye(len(self.prior))
            self._coef = np.linalg.solve(a, self.xty + self.ridge * self.prior)
        return self._coef

    def coef_list(self) -> list[float]:
        """``coef()`` as plain floats, which Python arithmetic reads faster than numpy scalars."""
        if self._coef_list is None:
            self._coef_list = self.coef().tolist()
        return self._coef_list


MAX_ACCEPT = 0.99  # the law's predictions are clipped to [0.01, MAX_ACCEPT]
ACCEPT_VARIANCE = 0.25  # a 0/1 acceptance's variance at most: the posterior Thompson sampling draws from
PRIOR_REQUESTS = 20  # an arm's own tokens per request outweigh the law's prediction once it has run this many
# A step time's relative spread beyond what was seen. Small: the host's speed moves all arms alike,
# and an arm timed while the host was busy is timed again (``plan``); drawn at 0.25, it spread near
# arms apart enough that Thompson sampling ran drafts where none paid (benchmarks/scylla_sim.py).
TIME_NOISE = 0.05
TIME_FLOOR = 0.5  # a draw of a step time stays above this share of its mean (no timing is off by more than 2x)


@dataclass
class FadedSamples:
    """One arm's step times, or the tokens its requests got per step: sums weighted by ``decay`` per
    policy step since each was seen (as of step ``at``, the last update); the mean is their ratio,
    which fading leaves alone."""

    weight: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    at: int = 0

    def add(self, seconds: float, now: int, decay: float) -> None:
        fade = decay ** (now - self.at)
        self.weight, self.total = self.weight * fade + 1, self.total * fade + seconds
        self.squares, self.at = self.squares * fade + seconds ** 2, now

    @property
    def mean(self) -> float:
        return self.total / self.weight

    def error(self, now: int, decay: float, noise: float) -> float:
        """The mean's standard error, ``noise`` added to the variance seen."""
        variance = max(self.squares / self.weight - self.mean ** 2, 0.0) + noise
        return math.sqrt(variance / self.left(now, decay))

    def left(self, now: int, decay: float) -> float:
        """The weight left after fading. A server's arm left alone for ~150K steps fades below floats:
        its error is then unbounded."""
        return max(self.weight * decay ** (now - self.at), 1e-12)


def _law_row(k: int, batch: int, depth: int, copying: bool = False) -> list[float]:
    return [1.0, math.log(k), math.log(batch), math.log(depth), float(copying)]


class Plan(NamedTuple):
    """A step's arm: ``depth`` draft tokens per chain for a request not copying, ``depth_copying`` for
    one copying (``copying`` of the step's requests were when it was chosen), ``chains`` chains each."""

    depth: int
    chains: int
    depth_copying: int
    copying: int = 0

    def depth_of(self, copying: bool) -> int:
        return self.depth_copying if copying else self.depth

    def deepest(self) -> int:
        return self.depth_copying if self.copying else self.depth

    def drafted(self, batch: int) -> int:
        """Draft tokens per chain over the step's requests: what its time is keyed by."""
        return (batch - self.copying) * self.depth + self.copying * self.depth_copying

    def step_key(self, batch: int) -> tuple[int, int, int]:
        """What the policy times a step by: (draft tokens per chain over its requests, chains, batch)."""
        return self.drafted(batch), self.chains, batch


@dataclass
class ScyllaPolicy:
    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    chains: tuple[int, ...] = (1,)
    explore: float = 0.1
    decay: float = 0.995
    prior_acceptance: float = 0.6
    seed: int = 0
    max_drafts: int | None = None  # chains x depth per request at most (an engine's fixed draft tree)
    acceptance: OnlineLeastSquares = field(init=False)
    cost: OnlineLeastSquares = field(init=False)
    _rng: random.Random = field(init=False)

    def __post_init__(self):
        if not self.depths or min(self.depths) < 0:
            raise ValueError(f"scylla depths={self.depths!r}: give speculation lengths >= 0 (0: no speculation)")
        if not self.chains or min(self.chains) < 1:
            raise ValueError(f"scylla chains={self.chains!r}: give chain counts >= 1")
        if not 0 <= self.explore < 1:
            raise ValueError(f"scylla explore={self.explore}: must be in [0, 1)")
        if not 0 < self.decay <= 1:
            raise ValueError(f"scylla decay={self.decay}: must be in (0, 1]")
        if self.max_drafts is not None and not any(0 < g * min(self.chains) <= self.max_drafts for g in self.depths):
            raise ValueError(f"scylla max_drafts={self.max_drafts}: no depth in {self.depths} with "
                             f"{min(self.chains)} chain(s) fits; allow more draft tokens or shorter depths")
        self.acceptance = OnlineLeastSquares([self.prior_acceptance, 0, 0, 0, 0], self.decay)
        self.cost = OnlineLeastSquares([0] * 6, self.decay, ridge=1e-6)
        self._rng = random.Random(self.seed)
        self._law_rng = np.random.default_rng(self.seed)
        # (draft tokens per chain over the step's requests, k, batch) -> its step times
        self._steps: dict[tuple[int, int, int], FadedSamples] = {}
        # (depth, k, batch, copying) -> tokens per request
        self._tokens: dict[tuple[int, int, int, bool], FadedSamples] = {}
        self._chosen: dict[int, int] = {}  # batch -> steps chosen so far
        self._now = 0  # steps observed, the clock arm times fade by

    def accept_rate(self, k: int, batch: int, depth: int, law: Sequence[float] | None = None,
                    copying: bool = False) -> float:
        # plain floats: with numpy's per-call cost on five-term rows, choosing an arm took 1-2 ms a step
        th = self.acceptance.coef_list() if law is None else law
        return min(max(sum(c * x for c, x in zip(th, _law_row(k, batch, depth, copying))), 0.01), MAX_ACCEPT)

    def law_tokens(self, k: int, batch: int, copying: bool = False, law: Sequence[float] | None = None,
                   rate: float | None = None) -> list[float]:
        """Tokens per request by the law alone (``rate``: that acceptance at every depth instead) at
        depths 0 to the deepest, ``1 + sum_{t<=g} prod_{j<=t} a(k, batch, j, copying)`` at depth g."""
        out, alive = [1.0], 1.0
        for t in range(1, max(self.depths) + 1):
            alive *= self.accept_rate(k, batch, t, law, copying) if rate is None else rate
            out.append(out[-1] + alive)
        return out

    def expected_tokens(self, depth: int, k: int, batch: int, rate: float | None = None,
                        law: Sequence[float] | None = None, draw: float | None = None, copying: bool = False,
                        by_law: list[float] | None = None) -> float:
        """Tokens per request of a step at ``depth`` for a request copying or not: the law's prediction,
        and where the arm has run at this batch size, the tokens its requests in that state got, the
        law counting as ``PRIOR_REQUESTS`` of them. ``rate`` fixes every depth's acceptance instead (the
        law alone), ``law`` gives the law's coefficients (default: the fit), ``draw`` (a number of
        standard errors, ``math.nan``: random) moves the arm's own mean; ``by_law``: ``law_tokens`` for
        the same chains, state, law and rate, where the caller has it."""
        total = (by_law or self.law_tokens(k, batch, copying, law, rate))[depth]
        seen = self._tokens.get((depth, k, batch, copying))
        if rate is not None or seen is None:
            return total
        mean, weight = seen.mean, seen.left(self._now, self.decay)
        if draw is not None:
            spread = self._law_rng.standard_normal() if math.isnan(draw) else draw
            mean += spread * seen.error(self._now, self.decay, ACCEPT_VARIANCE * depth)
        return (weight * mean + PRIOR_REQUESTS * total) / (weight + PRIOR_REQUESTS)

    def expected_seconds(self, depth: int, k: int, batch: int, draw: float | None = None) -> float | None:
        """A step's time where every request drafts ``depth`` tokens per chain (see ``_seconds``)."""
        return self._seconds(batch * depth, k, depth, batch, draw)

    def _seconds(self, drafted: int, k: int, deepest: int, batch: int, draw: float | None) -> float | None:
        """A step's time with ``drafted`` draft tokens per chain over its requests, ``deepest`` at most per
        request: the mean of the steps timed so averaged with the cost fit (which counts as what the other
        keys tell of this one), or ``draw`` standard errors from it (a number: that many; ``math.nan``: a
        random draw); from the cost fit where none was; None where it cannot tell."""
        seen = self._steps.get((drafted, k, batch))
        row = self._cost_row(drafted, deepest, k, batch)
        fit = sum(c * x for c, x in zip(self.cost.coef_list(), row)) if self.cost.seen >= 8 else None
        if seen is None:
            return fit
        mean, weight = seen.mean, seen.left(self._now, self.decay)
        # the fit's word on this key beyond the key's own steps (which the fit holds too): what the other
        # keys tell of it, nothing where its own steps alone place it (a term of its own, e.g. no drafts)
        others = max(self.cost.support(row) - weight, 0.0) if fit is not None else 0.0
        share = weight / (weight + others)
        error = seen.error(self._now, self.decay, (TIME_NOISE * mean) ** 2) * math.sqrt(share)
        mean = share * mean + (1 - share) * (fit or 0.0)
        if draw is None:
            return mean
        spread = self._law_rng.standard_normal() if math.isnan(draw) else draw
        return max(mean + spread * error, TIME_FLOOR * mean)

    @staticmethod
    def _cost_row(drafted: int, deepest: int, k: int, batch: int) -> list[float]:
        # in vLLM, k >= 2 chains are scored in a pass of fastctx's before the engine's, and a step with any
        # draft runs the engine's rejection sampler: costs of their own
        return [1.0, batch + k * drafted, deepest, k * drafted, float(k > 1), float(drafted > 0)]

    def choose(self, batch: int) -> tuple[int, int]:
        """(speculation depth, chain count) for the next step of ``batch`` requests, none known to be
        copying."""
        plan = self.plan(batch)
        return plan.depth, plan.chains

    def plan(self, batch: int, copying: int = 0) -> Plan:
        """The next step's arm for ``batch`` requests, ``copying`` of them copying."""
        if not 0 <= copying <= batch:
            raise ValueError(f"scylla plan: {copying} of {batch} requests copying; give 0 to {batch}")
        depths = sorted(self.depths)
        fits = [(g, k) for g in depths for k in (self.chains if g else (1,))
                if self.max_drafts is None or g * k <= self.max_drafts]
        # A request copying drafts at least as deep as one not: its drafts are likelier to stand. Where
        # every request is in one state, the other's depth is moot and kept equal.
        arms = [Plan(g, k, gc, copying) for g, k in fits for gc, kc in fits
                if kc == k and (gc == g if copying in (0, batch) else gc >= g)]
        n = self._chosen.get(batch, 0)
        self._chosen[batch] = n + 1
        spec = [g for g in depths if g]
        for g, k in ((depths[0], 1), (spec[0], min(self.chains)) if spec else (depths[0], 1)):
            probe = Plan(g, k, g, copying)
            if probe.step_key(batch) not in self._steps:
                return probe

        def rater(law=None, draw=None, tokens_draw=None, optimistic=False):
            """Tokens per second of an arm under one draw: each (depth, chains, state)'s tokens and each step
            key's time drawn once for all the arms that share it. ``optimistic``: two standard errors
            luckier than seen in tokens (every draft accepted where an arm has not run) and step time."""
            tokens, seconds, by_law = {}, {}, {}
            law_list = None if law is None else law.tolist()

            def law_tokens(k, state, rate):
                if (k, state, rate) not in by_law:
                    by_law[k, state, rate] = self.law_tokens(k, batch, state, law_list, rate)
                return by_law[k, state, rate]

            def per_request(g, k, state):
                if (g, k, state) not in tokens:
                    if optimistic:
                        rate = None if (g, k, batch, state) in self._tokens else MAX_ACCEPT
                        tokens[g, k, state] = self.expected_tokens(g, k, batch, rate, draw=None if rate else 2.0,
                                                                   copying=state, by_law=law_tokens(k, state, rate))
                    else:
                        tokens[g, k, state] = self.expected_tokens(g, k, batch, None, law_list, tokens_draw, state,
                                                                   law_tokens(k, state, None))
                return tokens[g, k, state]

            def rate(arm):
                key = arm.drafted(batch), arm.chains
                if key not in seconds:
                    seconds[key] = self._seconds(*key, arm.deepest(), batch, -2.0 if optimistic else draw)
                if seconds[key] is None:  # neither seen nor predictable yet
                    return -math.inf
                total = ((batch - copying) * per_request(arm.depth, arm.chains, False) if copying < batch else 0.0) \
                    + (copying * per_request(arm.depth_copying, arm.chains, True) if copying else 0.0)
                return total / max(seconds[key], 1e-9)

            return rate

        mean_rate = rater()
        best = max(arms, key=mean_rate)
        if not self.explore:
            return best
        bar = mean_rate(best)
        lucky = rater(optimistic=True)
        at = depths.index

        def next_to(a):
            """A depth or two (one per state) an index up or down at the same chains or one chain, or the
            same depths at twice or half the chains."""
            moved = max(abs(at(a.depth) - at(best.depth)), abs(at(a.depth_copying) - at(best.depth_copying)))
            return (moved == 1 and a.chains in (best.chains, 1)) or (
                moved == 0 and a.chains in (2 * best.chains, best.chains // 2))

        neighbours = [a for a in arms if a != best and next_to(a)]
        # A neighbour last timed longer ago than the policy remembers, which would win had its steps
        # been timed while the host was busy (TIME_FLOOR of their time), is timed again: fading alone
        # leaves a step's time as slow as it was seen, however long ago.
        memory = 1 / (1 - self.decay) if self.decay < 1 else math.inf
        stale = [a for a in neighbours if (seen := self._steps.get(a.step_key(batch))) is not None
                 and self._now - seen.at > memory and mean_rate(a) / TIME_FLOOR > bar]
        if stale:
            return max(stale, key=mean_rate)
        # kept: arms that could win, and arms whose step time cannot be told yet (rated -inf)
        near = [a for a in neighbours if (r := lucky(a)) > bar or r == -math.inf]
        if self._rng.random() < self.explore / (1 + n / 20) and near:
            return self._rng.choice(near)
        # Thompson sampling: the arms timed at this batch size and the best one's neighbours, ranked by a
        # law drawn from the fit's posterior and step times drawn around their means, so what was seen on
        # few or long-past steps (a short request, a new batch size, a busy moment) is tried again, and
        # what was seen on many settles.
        timed = [a for a in arms if a.step_key(batch) in self._steps and (a == best or lucky(a) > bar)]
        law = self.acceptance.sample(self._law_rng, ACCEPT_VARIANCE)
        return max(dict.fromkeys([best, *timed, *near]), key=rater(law=law, draw=math.nan, tokens_draw=math.nan))

    def observe(self, depth: int, k: int, batch: int, accepted: list[int], seconds: float) -> None:
        """One step in which every request drafted ``depth`` tokens per chain: how many each accepted, and
        the step's wall time."""
        self.observe_plan(Plan(depth, k, depth), batch, accepted, seconds)

    def observe_plan(self, plan: Plan, batch: int, accepted: list[int], seconds: float,
                     copying: list[bool] | None = None) -> None:
        """One step run by ``plan``: how many draft tokens each request accepted (the requests verified;
        ``batch`` were in the step), whether each was copying when the plan was made (default: none),
        and the step's wall time."""
        copying = copying or [False] * len(accepted)
        if len(copying) != len(accepted):
            raise ValueError(f"scylla observe: {len(accepted)} requests' accepted drafts but {len(copying)} "
                             "copying flags; give one per request")
        rows, ys = [], []
        for a, c in zip(accepted, copying):
            for t in range(1, min(a + 1, plan.depth_of(c)) + 1):
                rows.append(_law_row(plan.chains, batch, t, c))
                ys.append(1.0 if t <= a else 0.0)
        if rows:
            self.acceptance.add(np.array(rows), np.array(ys))
        self.cost.add(np.array([self._cost_row(plan.drafted(batch), plan.deepest(), plan.chains, batch)]),
                      np.array([seconds]))
        self._now += 1
        self._steps.setdefault(plan.step_key(batch), FadedSamples()).add(seconds, self._now, self.decay)
        for a, c in zip(accepted, copying):
            depth = plan.depth_of(c)
            self._tokens.setdefault((depth, plan.chains, batch, bool(c)), FadedSamples()).add(
                1.0 + min(a, depth), self._now, self.decay)

    def law(self) -> dict:
        th = self.acceptance.coef()
        c = self.cost.coef()
        th, c = [float(x) for x in th], [float(x) for x in c]  # plain floats: the law crosses RPCs as msgpack
        batches = sorted({key[2] for key in self._tokens} | {key[2] for key in self._steps})
        return {"acceptance": {"intercept": th[0], "ln_chains": th[1], "ln_batch": th[2], "ln_depth": th[3],
                               "copying": th[4]},
                "step_seconds": {"fixed": c[0], "per_target_token": c[1], "per_draft_step": c[2],
                                 "per_draft_token": c[3], "two_or_more_chains": c[4], "any_draft": c[5]},
                "observations": int(self.acceptance.seen),
                # per batch size, the mean step time and (faded) steps behind it per draft tokens over the
                # step's requests and chains (D8k1: eight draft tokens in all, one chain each), and per
                # depth and chains the tokens per request it gave requests not copying and copying
                "steps": {f"b{b}": {f"D{d}k{k}": {"seconds": t.mean, "steps": t.weight}
                                    for (d, k, bb), t in sorted(self._steps.items()) if bb == b} for b in batches},
                "arms": {f"b{b}": {f"d{g}k{k}": {name: self._tokens[g, k, b, c].mean if (g, k, b, c) in self._tokens
                                                 else None for name, c in (("tokens", False), ("tokens_copying", True))}
                                   for g, k in sorted({(g, k) for g, k, bb, _ in self._tokens if bb == b})}
                         for b in batches}}
