"""Scylla's policy against every fixed speculation length on a simulated draft, with the budget of
``spec_decode.py`` (batch sizes 1, 2, 4, 8 in turn, each running 8 requests x 128 tokens in batches
of its size, twice; the second pass is scored) and step costs shaped like vLLM's on this CPU (round
18: 47 ms + 4.6 ms per request, 5 ms once anything is drafted, 4 ms x draft tokens^0.85, 105 ms for
fastctx's scoring pass of two or more chains; ``--costs round22``: round 22's, 48 ms + 5.8 ms per
request, 1 ms once anything is drafted, 6 ms per draft token, 90 ms for many chains). The draft's
acceptance runs in streaks as the n-gram draft's does on copy prompts (round 16: one chain accepts
0.64 per depth while a request is copying, 0.20 otherwise), or with ``--acceptance law`` as the law
Scylla fitted in vLLM (round 18, run 2: 0.15 + 0.19 ln t + 0.32 while copying, at depth t after
t - 1 accepted; ``law22``: round 22's, 0.128 + 0.103 ln t + 0.389 while copying); the host's speed moves
by up to ``--drift`` per batch of prompts.

No engine runs: this isolates the policy's choices (a minute instead of ``spec_decode.py``'s 35,
where the host's noise hides differences of a few percent). Scylla and the fixed lengths see the
same random streams per seed. Each batch of prompts runs to its end together, as
``spec_decode.py``'s do: a request that drafts its way ahead leaves the last steps to fewer
requests, where a server would give its slot to a waiting one. So each policy's tokens per second
come with its rate over the steps where the batch was still full (what it would give a server
holding that batch size), and Scylla's with its own wall time per step, choosing and observing
(what it adds to each real step; vLLM's here take 50-100 ms). ``--refills N`` keeps the batch full
instead until each slot has run N + 1 requests; ``--explore`` sets Scylla's knob. The last line
printed is one JSON object.

    python benchmarks/scylla_sim.py --seeds 12
    python benchmarks/scylla_sim.py --seeds 12 --acceptance law
    python benchmarks/scylla_sim.py --seeds 24 --acceptance law --refills 2 --explore 0
    python benchmarks/scylla_sim.py --seeds 24 --acceptance law22 --costs round22
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from fastctx.specdec.scylla import Plan, ScyllaPolicy

BATCHES = (1, 2, 4, 8)


class FixedArm:
    """One depth for every request, every step: what a user sets with ``num_speculative_tokens``."""

    def __init__(self, depth: int):
        self.depth = depth

    def plan(self, batch: int, copying: int = 0) -> Plan:
        return Plan(self.depth, 1, self.depth, copying)

    def observe_plan(self, *_, **__) -> None:
        pass


def streaky(copying: bool, depth: int) -> float:
    return 0.64 if copying else 0.20


def fitted_law(intercept: float, ln_depth: float, copying_term: float):
    """An acceptance law Scylla fitted in vLLM, at one chain and batch size 1."""
    def law(copying: bool, depth: int) -> float:
        return min(max(intercept + ln_depth * math.log(depth) + copying_term * copying, 0.01), 0.99)
    return law


ACCEPTANCE = {"streaky": streaky, "law": fitted_law(0.15, 0.19, 0.32), "law22": fitted_law(0.128, 0.103, 0.389)}


def round18_cost(batch: int, drafted: int, chains: int) -> float:
    return 0.047 + 0.0046 * batch + 0.005 * (drafted > 0) + 0.004 * drafted ** 0.85 + 0.105 * (chains > 1)


def round22_cost(batch: int, drafted: int, chains: int) -> float:
    """Round 22's step times in vLLM (Scylla's per-key means): ~6 ms a draft token, where round 18's
    shape charged 4 ms x draft tokens^0.85."""
    return 0.0484 + 0.0058 * batch + 0.001 * (drafted > 0) + 0.006 * drafted + 0.09 * (chains > 1)


COSTS = {"round18": round18_cost, "round22": round22_cost}


def acceptance(copying: bool, chains: int, depth: int = 1, law=streaky) -> float:
    one = law(copying, depth)
    return one + (1 - one) * one * 0.25 * math.log2(chains)  # more chains, a little more accepted


def run_batch(policy, rng: random.Random, batch: int, speed: float, new_tokens: int = 128,
              own: list | None = None, law=streaky, refills: int = 0,
              cost=round18_cost) -> tuple[int, float, int, float]:
    """Decode ``batch`` requests to ``new_tokens`` each, ``refills`` more taking the slots of those that
    finish (then the batch shrinks): tokens and seconds, in all and over the steps with every slot
    busy. ``own`` gathers the policy's own wall time per step (plan and observe)."""
    done, copying, tokens, seconds, full = [0] * batch, [False] * batch, 0, 0.0, [0, 0.0]
    while any(d < new_tokens for d in done):
        live = [i for i in range(batch) if done[i] < new_tokens]
        states = [copying[i] for i in live]
        started = time.perf_counter()
        plan = policy.plan(len(live), sum(states))
        planned = time.perf_counter() - started
        depths = [plan.depth_of(c) for c in states]
        drafted = plan.chains * sum(depths)
        spent = cost(len(live), drafted, plan.chains) * speed * rng.uniform(0.85, 1.15)
        accepted = []
        for g, c in zip(depths, states):
            a = 0
            while a < g and rng.random() < acceptance(c, plan.chains, a + 1, law):
                a += 1
            accepted.append(a)
        started = time.perf_counter()
        policy.observe_plan(plan, len(live), accepted, spent, states)
        if own is not None:
            own.append(planned + time.perf_counter() - started)
        step_tokens = 0
        for i, a in zip(live, accepted):
            got = min(1 + a, new_tokens - done[i])
            done[i], step_tokens = done[i] + got, step_tokens + got
            copying[i] = rng.random() < ((0.9 if a else 0.55) if copying[i] else 0.15)
        tokens, seconds = tokens + step_tokens, seconds + spent
        if len(live) == batch:
            full = [full[0] + step_tokens, full[1] + spent]
        for i in live:
            if done[i] == new_tokens and refills:
                done[i], copying[i], refills = 0, False, refills - 1
    return tokens, seconds, *full


def second_pass(make, seed: int, drift: float, own: dict | None = None, law=streaky,
                refills: int = 0, cost=round18_cost) -> dict[int, tuple]:
    """Per batch size, tokens per second on the second of two passes, in all and over the steps with
    the batch full (``own``: per batch size, the policy's wall time per step; ``refills``: requests per
    slot after the first in each batch of prompts)."""
    rng, host = random.Random(seed), random.Random(seed + 1000)
    policy, out = make(), {}
    for scored in (False, True):
        for b in BATCHES:
            sums = [0.0] * 4
            for _ in range(8 // b):
                run = run_batch(policy, rng, b, host.uniform(1 - drift, 1 + drift),
                                own=None if own is None else own.setdefault(b, []), law=law,
                                refills=refills * b, cost=cost)
                sums = [x + y for x, y in zip(sums, run)]
            if scored:
                out[b] = (sums[0] / sums[1], sums[2] / sums[3])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--drift", type=float, default=0.2, help="the host's speed moves by up to this share")
    ap.add_argument("--max-depth", type=int, default=7, help="Scylla's depths 0..this (vLLM's: 0..6 + 1)")
    ap.add_argument("--acceptance", choices=sorted(ACCEPTANCE), default="streaky",
                    help="the draft's acceptance per depth: streaky (0.64 copying, else 0.20) or vLLM's fitted law "
                         "(law: round 18's, law22: round 22's)")
    ap.add_argument("--costs", choices=sorted(COSTS), default="round18",
                    help="step times: round 18's shape (4 ms x draft tokens^0.85) or round 22's (6 ms a draft token)")
    ap.add_argument("--explore", type=float, default=ScyllaPolicy.explore,
                    help="Scylla's explore knob (0: the fit's best arm every step, no Thompson sampling)")
    ap.add_argument("--refills", type=int, default=0,
                    help="per slot, this many more requests take the place of one that finishes (a server's "
                         "sustained batch size; 0: each batch of prompts runs to its end together)")
    args = ap.parse_args()
    seeds = range(args.seeds)
    depths = tuple(range(args.max_depth + 1))
    law, cost = ACCEPTANCE[args.acceptance], COSTS[args.costs]
    fixed = {g: [second_pass(lambda g=g: FixedArm(g), s, args.drift, law=law, refills=args.refills, cost=cost)
                 for s in seeds] for g in depths}
    own: dict[int, list[float]] = {}  # batch -> Scylla's own wall time per step (both passes)
    scylla = [second_pass(lambda s=s: ScyllaPolicy(depths=depths, chains=(1, 2, 4), seed=s, explore=args.explore),
                          s, args.drift, own, law, args.refills, cost) for s in seeds]

    def mean(runs, b, full=False):
        return sum(r[b][full] for r in runs) / len(runs)

    result = {"seeds": args.seeds, "drift": args.drift, "acceptance": args.acceptance, "costs": args.costs,
              "explore": args.explore, "refills": args.refills, "per_batch": {}}
    for b in BATCHES:
        best = max(depths, key=lambda g: mean(fixed[g], b))
        ratio = mean(scylla, b) / mean(fixed[best], b)
        worst = min(s[b][0] / f[b][0] for s, f in zip(scylla, fixed[best]))
        best_full = max(depths, key=lambda g: mean(fixed[g], b, True))
        ratio_full = mean(scylla, b, True) / mean(fixed[best_full], b, True)
        policy_ms = 1000 * sum(own[b]) / len(own[b])
        result["per_batch"][b] = {"best_fixed_depth": best, "tokens_per_s_best_fixed": mean(fixed[best], b),
                                  "tokens_per_s_scylla": mean(scylla, b), "scylla_vs_best_fixed": ratio,
                                  "scylla_vs_best_fixed_worst_seed": worst,
                                  "best_fixed_depth_batch_full": best_full,
                                  "scylla_vs_best_fixed_batch_full": ratio_full, "policy_ms_per_step": policy_ms}
        print(f"b{b}: best fixed depth {best} {mean(fixed[best], b):6.2f} tok/s, Scylla {mean(scylla, b):6.2f} "
              f"({ratio:.3f}x; worst seed {worst:.3f}x); with the batch full: d{best_full} "
              f"{mean(fixed[best_full], b, True):6.2f}, Scylla {ratio_full:.3f}x; Scylla's own time "
              f"{policy_ms:.2f} ms a step", flush=True)
    result["scylla_vs_best_fixed_min"] = min(v["scylla_vs_best_fixed"] for v in result["per_batch"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
