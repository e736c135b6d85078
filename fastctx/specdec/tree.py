"""SpecTr's k draft chains laid out as one token tree, for engines that verify trees (SGLang).

Node 0 is the request's newest token (its K/V not yet computed); chain ``c``'s token at depth
``t`` (0-based) is node ``1 + c * depth + t``, child of the chain's previous token (of node 0 at
depth 0). The target's logits at a node give its distribution for the token after it, so chain
``c``'s K-SEQ rows are node 0 then the chain's nodes, and its last node's row is the bonus. An
engine whose tree size is fixed (SGLang) gets the nodes beyond the chains as leaves of node 0,
which verification never reads.
"""

from __future__ import annotations

import torch


def tree_size(chains: int, depth: int) -> int:
    return 1 + chains * depth


def chain_tree(chains: int, depth: int, size: int | None = None) -> torch.Tensor:
    """``[n, n]`` bool: node ``i`` marks itself and its ancestors (n = 1 + chains * depth, or ``size``
    with unused leaves under node 0)."""
    n = tree_size(chains, depth) if size is None else size
    if n < tree_size(chains, depth):
        raise ValueError(f"{chains} chains of depth {depth} need {tree_size(chains, depth)} tree nodes, not {n}")
    marks = torch.eye(n, dtype=torch.bool)
    marks[:, 0] = True
    for c in range(chains):
        first = 1 + c * depth
        for t in range(depth):
            marks[first + t, first:first + t] = True
    return marks


def chain_rows(chains: int, depth: int) -> torch.Tensor:
    """``[chains, depth + 1]``: the nodes whose logits give chain ``c``'s target rows (K-SEQ's ``q``)."""
    rows = torch.zeros(chains, depth + 1, dtype=torch.long)
    rows[:, 1:] = 1 + torch.arange(chains)[:, None] * depth + torch.arange(depth)
    return rows


def accepted_path(chain: int, accepted: int, depth: int) -> list[int]:
    """The nodes behind a verdict: node 0, then the chain's first ``accepted`` tokens."""
    return [0] + [1 + chain * depth + t for t in range(accepted)]
