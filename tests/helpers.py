import torch

from fastctx.kernels.sparse import _EMPTY, SparseIndex, dense_index, streaming_index, vertical_slash_index


def random_qkv(heads, kv_heads, q_len, prefix, dim, dtype=torch.float32, seed=0):
    """q ``[H, q_len, D]`` and k/v split into the new chunk and its cached prefix:
    ``(q, k_new, v_new, k_prefix, v_prefix)``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(kv_heads, prefix + q_len, dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, prefix + q_len, dim, generator=g).to(dtype)
    return q, k[:, prefix:], v[:, prefix:], k[:, :prefix], v[:, :prefix]


def _stack_ranges(per_head: list[torch.Tensor]) -> torch.Tensor:
    width = max(1, max(r.shape[1] for r in per_head))
    out = torch.full((len(per_head), per_head[0].shape[0], width, 2), _EMPTY, dtype=torch.int32)
    for h, r in enumerate(per_head):
        out[h, :, : r.shape[1]] = r
    return out


def _slash_groups_1d(offsets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge diagonals (descending offsets) whose key intervals touch in a block of ``rows`` rows."""
    gap = (offsets[:-1] - offsets[1:]) > rows
    starts = torch.cat([torch.tensor([True]), gap])
    group = torch.cumsum(starts.long(), 0) - 1
    ngroups = int(group[-1]) + 1
    smax = torch.full((ngroups,), -1, dtype=torch.long).scatter_reduce(0, group, offsets, "amax")
    smin = torch.full((ngroups,), 1 << 40, dtype=torch.long).scatter_reduce(0, group, offsets, "amin")
    return smax, smin


def vertical_slash_index_loop(vertical: torch.Tensor, slash: torch.Tensor, q_len: int, prefix: int = 0,
                              block_q: int = 64) -> SparseIndex:
    """The per-head loop that ``fastctx.kernels.sparse.vertical_slash_index`` replaced, kept as
    its oracle: the same layout, built one head at a time."""
    heads = vertical.shape[0]
    if slash.shape[0] != heads:
        raise ValueError(f"vertical and slash must have the same heads, got {vertical.shape} and {slash.shape}")
    probe = dense_index(1, q_len, prefix, block_q)
    first, last = probe.block_rows()
    sizes = last - first + 1
    per_head, cols = [], []
    for h in range(heads):
        offsets = torch.unique(slash[h].long().clamp(min=0), sorted=True).flip(0)
        ranges = []
        for rows in torch.unique(sizes).tolist():  # full blocks, then a shorter last block
            smax, smin = _slash_groups_1d(offsets, rows)
            sel = sizes == rows
            start = (first[sel, None] - smax[None]).clamp(min=0)
            end = last[sel, None] - smin[None] + 1
            empty = end <= start
            ranges.append((sel, torch.stack([torch.where(empty, 0, start), torch.where(empty, 0, end)], -1)))
        width = max(r.shape[1] for _, r in ranges)
        # Empty slots sort last, so each block's starts stay ascending for searchsorted.
        block_ranges = torch.full((len(first), width, 2), _EMPTY, dtype=torch.long)
        for sel, r in ranges:
            block_ranges[sel, : r.shape[1]] = r
        per_head.append(block_ranges.int())
        verts = torch.unique(vertical[h].long(), sorted=True)
        verts = verts[(verts >= 0) & (verts <= last[-1])]
        starts, ends = block_ranges[..., 0].contiguous(), block_ranges[..., 1]
        at = torch.searchsorted(starts, verts[None].expand(len(first), -1).contiguous(), right=True) - 1
        covered = (at >= 0) & (verts[None] < ends.gather(1, at.clamp(min=0)))
        visible = verts[None] <= last[:, None]
        cols.append(torch.where(covered | ~visible, -1, verts[None]).int())
    width = max(1, max(c.shape[1] for c in cols))
    col_t = torch.full((heads, len(first), width), -1, dtype=torch.int32)
    for h, c in enumerate(cols):
        col_t[h, :, : c.shape[1]] = c
    return SparseIndex(_stack_ranges(per_head), col_t, q_len, prefix, block_q)


def random_vs_index(heads, q_len, prefix, block_q, seed=0) -> SparseIndex:
    """A vertical-slash index over random columns and diagonals (plus the first few of each)."""
    g = torch.Generator().manual_seed(seed)
    total = prefix + q_len
    vertical = torch.cat([torch.arange(min(4, total)).expand(heads, -1),
                          torch.randint(0, total, (heads, 9), generator=g)], 1)
    slash = torch.cat([torch.arange(min(5, total)).expand(heads, -1),
                       torch.randint(0, total, (heads, 6), generator=g)], 1)
    return vertical_slash_index(vertical, slash, q_len, prefix, block_q)


# Index kinds the kernel tests run: (heads, q_len, prefix, block_q) -> SparseIndex.
INDEXES = {
    "dense": lambda h, t, p, b: dense_index(h, t, p, b),
    "streaming": lambda h, t, p, b: streaming_index(h, t, sink=3, local=20, prefix=p, block_q=b),
    "vertical-slash": random_vs_index,
}
