"""``sgl_kernel.speculative`` stand-in: the tree metadata SGLang's NGRAM-style verification reads."""

from __future__ import annotations

import torch


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrieve_index, retrieve_next_token,
                                       retrieve_next_sibling, batch_size: int, draft_token_num: int) -> None:
    """In place, per request ``b`` and node ``i`` of its ``n``-node tree (``tree_mask[b, i, j]``, flat:
    node ``j`` is ``i`` or an ancestor of ``i``): ``positions`` = its ancestors + ``verified_seq_len[b]``;
    ``retrieve_index`` = ``b * n + i``; ``retrieve_next_token`` its first child, ``retrieve_next_sibling``
    the next child of its parent (-1 for none), as SGLang's Triton fallback defines them."""
    n = draft_token_num
    nodes = torch.arange(n)
    marks = tree_mask.view(batch_size, n, n).cpu() & (nodes[None, :] < nodes[:, None])  # strict ancestors
    depth = marks.sum(-1)
    parent = torch.where(marks, nodes, -1).amax(-1)  # [B, n]
    first_child = torch.where(marks, nodes[:, None], n).amin(1)  # over the rows that have node j as ancestor
    later = nodes[:, None] > nodes[None, :]  # [k, i]: k after i
    same_parent = (parent[:, :, None] == parent[:, None, :]) & later  # [B, k, i]
    sibling = torch.where(same_parent, nodes[:, None], n).amin(1)
    positions.view(batch_size, n).copy_(depth + verified_seq_len.view(-1, 1).cpu())
    retrieve_index.view(batch_size, n).copy_(torch.arange(batch_size * n).view(batch_size, n))
    retrieve_next_token.view(batch_size, n).copy_(torch.where(first_child < n, first_child, -1))
    retrieve_next_sibling.view(batch_size, n).copy_(torch.where((parent >= 0) & (sibling < n), sibling, -1))
