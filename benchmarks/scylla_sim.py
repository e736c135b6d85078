"""Scylla's policy against every fixed speculation length on a simulated draft, with the budget of
``spec_decode.py`` (batch sizes 1, 2, 4, 8 in turn, each running 8 requests x 128 tokens in batches of
its size, twice; the second pass is scored) and step costs shaped like vLLM's on this CPU (round 18:
47 ms + 4.6 ms per request, 5 ms once anything is drafted, 4 ms x draft tokens^0.85, 105 ms for
fastctx's scoring pass of two or more chains). The draft's acceptance runs in streaks as the n-gram
draft's does on copy prompts (round 16: one chain accepts 0.64 per depth while a request is copying,
0.20 otherwise); the host's speed moves by up to ``--drift`` per batch of prompts.

No engine runs: this isolates the policy's choices (a minute instead of ``spec_decode.py``'s 35,
where the host's noise hides differences of a few percent). Scylla and the fixed lengths see the
same random streams per seed. Scylla's own wall time per step (choosing and observing) is printed
beside: what it adds to each real step (vLLM's here take 50-100 ms). The last line printed is one
JSON object.

    python benchmarks/scylla_sim.py --seeds 12
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


def acceptance(copying: bool, chains: int) -> float:
    one = 0.64 if copying else 0.20
    return one + (1 - one) * one * 0.25 * math.log2(chains)  # more chains, a little more accepted


def run_batch(policy, rng: random.Random, batch: int, speed: float, new_tokens: int = 128,
              own: list | None = None) -> tuple[int, float]:
    """Decode ``batch`` requests to ``new_tokens`` each (the batch shrinks as they finish); ``own``
    gathers the policy's own wall time per step (plan and observe)."""
    done, copying, tokens, seconds = [0] * batch, [False] * batch, 0, 0.0
    while any(d < new_tokens for d in done):
        live = [i for i in range(batch) if done[i] < new_tokens]
        states = [copying[i] for i in live]
        started = time.perf_counter()
        plan = policy.plan(len(live), sum(states))
        planned = time.perf_counter() - started
        depths = [plan.depth_of(c) for c in states]
        drafted = plan.chains * sum(depths)
        spent = (0.047 + 0.0046 * len(live) + 0.005 * (drafted > 0) + 0.004 * drafted ** 0.85
                 + 0.105 * (plan.chains > 1)) * speed * rng.uniform(0.85, 1.15)
        accepted = []
        for g, c in zip(depths, states):
            a = 0
            while a < g and rng.random() < acceptance(c, plan.chains):
                a += 1
            accepted.append(a)
        started = time.perf_counter()
        policy.observe_plan(plan, len(live), accepted, spent, states)
        if own is not None:
            own.append(planned + time.perf_counter() - started)
        for i, a in zip(live, accepted):
            got = min(1 + a, new_tokens - done[i])
            done[i], tokens = done[i] + got, tokens + got
            copying[i] = rng.random() < ((0.9 if a else 0.55) if copying[i] else 0.15)
        seconds += spent
    return tokens, seconds


def second_pass(make, seed: int, drift: float, own: dict | None = None) -> dict[int, float]:
    """Tokens per second per batch size on the second of two passes (``own``: per batch size, the
    policy's wall time per step)."""
    rng, host = random.Random(seed), random.Random(seed + 1000)
    policy, out = make(), {}
    for scored in (False, True):
        for b in BATCHES:
            tokens = seconds = 0.0
            for _ in range(8 // b):
                t, s = run_batch(policy, rng, b, host.uniform(1 - drift, 1 + drift),
                                 own=None if own is None else own.setdefault(b, []))
                tokens, seconds = tokens + t, seconds + s
            if scored:
                out[b] = tokens / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--drift", type=float, default=0.2, help="the host's speed moves by up to this share")
    ap.add_argument("--max-depth", type=int, default=7, help="Scylla's depths 0..this (vLLM's: 0..6 + 1)")
    args = ap.parse_args()
    seeds = range(args.seeds)
    depths = tuple(range(args.max_depth + 1))
    fixed = {g: [second_pass(lambda g=g: FixedArm(g), s, args.drift) for s in seeds] for g in depths}
    own: dict[int, list[float]] = {}  # batch -> Scylla's own wall time per step (both passes)
    scylla = [second_pass(lambda s=s: ScyllaPolicy(depths=depths, chains=(1, 2, 4), seed=s), s, args.drift, own)
              for s in seeds]

    def mean(runs, b):
        return sum(r[b] for r in runs) / len(runs)

    result = {"seeds": args.seeds, "drift": args.drift, "per_batch": {}}
    for b in BATCHES:
        best = max(depths, key=lambda g: mean(fixed[g], b))
        ratio = mean(scylla, b) / mean(fixed[best], b)
        worst = min(s[b] / f[b] for s, f in zip(scylla, fixed[best]))
        policy_ms = 1000 * sum(own[b]) / len(own[b])
        result["per_batch"][b] = {"best_fixed_depth": best, "tokens_per_s_best_fixed": mean(fixed[best], b),
                                  "tokens_per_s_scylla": mean(scylla, b), "scylla_vs_best_fixed": ratio,
                                  "scylla_vs_best_fixed_worst_seed": worst, "policy_ms_per_step": policy_ms}
        print(f"b{b}: best fixed depth {best} {mean(fixed[best], b):6.2f} tok/s, Scylla {mean(scylla, b):6.2f} "
              f"({ratio:.3f}x; worst seed {worst:.3f}x); Scylla's own time {policy_ms:.2f} ms a step", flush=True)
    result["scylla_vs_best_fixed_min"] = min(v["scylla_vs_best_fixed"] for v in result["per_batch"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
