"""Teacher-forced agreement of a method with dense, from the engine's prompt logprobs.

Both servers score the same token ids; at each position the engine returns its
top-k next-token logprobs (plus the actual token's). From those:

- ``top1``: the share of positions where both put the same token first (the
  top-k lists hold the argmax, so this is exact);
- ``kl_nats``: mean KL(dense || method) over the tokens listed by both plus one
  bucket for all other tokens. Merging tokens can only lower a KL, so this is a
  lower bound of the full-vocabulary KL; with k = 20 the bucket holds little mass
  on this model.
"""

from __future__ import annotations

import math


def position_kl(ref: dict, test: dict) -> float:
    shared = ref.keys() & test.keys()
    kl, p_rest, q_rest = 0.0, 1.0, 1.0
    for tok in shared:
        p, q = math.exp(ref[tok]), math.exp(test[tok])
        kl += p * (ref[tok] - test[tok])
        p_rest -= p
        q_rest -= q
    p_rest, q_rest = max(p_rest, 0.0), max(q_rest, 1e-12)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(kl, 0.0)


def compare(ref_rows: list[dict], test_rows: list[dict]) -> dict:
    if len(ref_rows) != len(test_rows):
        raise ValueError(f"{len(ref_rows)} reference positions vs {len(test_rows)}: not the same input")
    top1 = [max(r, key=r.get) == max(t, key=t.get) for r, t in zip(ref_rows, test_rows)]
    kls = [position_kl(r, t) for r, t in zip(ref_rows, test_rows)]
    n = len(top1)
    return {"top1_agree": sum(top1) / n if n else None, "kl_nats": sum(kls) / n if n else None,
            "positions": n}
