"""Sparse causal prefill attention over one index format.

Every method (MInference's vertical-slash, block-sparse and A-shape heads,
FlexPrefill, LServe's streaming heads) says which keys each query block
reads. ``SparseIndex`` holds that as, per (head, query block of
``block_q`` rows), contiguous key ranges ``[start, end)`` and single key
columns; the causal limit (key position <= query position) applies on top.
Queries are a chunk of ``q_len`` tokens that follows ``prefix`` cached tokens
(chunked prefill), so the query at row ``i`` sits at position ``prefix + i``,
unless the index carries explicit ascending ``positions`` (scattered
recomputed tokens), in which case row ``i`` sits at ``positions[i]``.

``reference_sparse_prefill_attention`` is the definition (masked dense
softmax); ``sparse_prefill_attention`` dispatches to the C++ kernel on CPU,
the Triton kernel on CUDA, the reference elsewhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastctx.kernels.dense import _check, _join_prefix

DEFAULT_BLOCK_Q = 64
# The CPU kernel's sgemm path copies ranges shorter than this many keys into its column
# tiles instead of scoring each with its own small matrix product (its micro-kernels read
# ranges in place down to 8 keys).
GATHER_BELOW = 128
# The CPU kernel's register-blocked AVX-512 micro-kernels (head_dim 32/64/128 on AVX-512 hosts);
# False takes the sgemm path every other host uses (tests run both on one machine).
MICRO_KERNELS = True
_EMPTY = 2**31 - 1  # start = end = this: an unused range slot


@dataclass(frozen=True)
class SparseIndex:
    ranges: torch.Tensor  # [H, R, NR, 2] int32 (start, end); start >= end is an empty slot
    cols: torch.Tensor  # [H, R, NC] int32 key positions; -1 is an empty slot
    q_len: int
    prefix: int = 0
    block_q: int = DEFAULT_BLOCK_Q
    positions: torch.Tensor | None = None  # [q_len] ascending query positions; None: prefix + row

    @property
    def num_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @functools.cached_property
    def has_cols(self) -> bool:
        """Whether any block lists single columns (decode indexes reused across steps ask once). On an
        accelerator it answers True without asking: the answer would stall the stream, and counting
        columns that are all absent only costs work."""
        return self.cols.device.type != "cpu" or bool((self.cols >= 0).any())

    @property
    def num_keys(self) -> int:
        """Keys up to the last query's position (the chunk's context plus the chunk)."""
        return self.prefix + self.q_len if self.positions is None else int(self.positions[-1]) + 1

    def row_positions(self) -> torch.Tensor:
        if self.positions is None:
            return self.prefix + torch.arange(self.q_len)
        return self.positions.long().cpu()

    def block_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Position of the first and of the last query of every block, each ``[R]``."""
        pos = self.row_positions()
        starts = torch.arange(self.num_blocks) * self.block_q
        return pos[starts], pos[torch.clamp(starts + self.block_q - 1, max=self.q_len - 1)]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[H, len(rows), num_keys]`` bool: the (query, key) pairs the index reads.

        ``rows`` are query rows (0-based within the chunk); all rows by default.
        """
        rows = torch.arange(self.q_len) if rows is None else rows.long()
        block = rows // self.block_q
        return rows_mask(self.ranges[:, block], self.cols[:, block], self.row_positions()[rows], self.num_keys)

    def density(self) -> float:
        """Share of the causal (query, key) pairs that the index reads (1.0 = dense)."""
        read, causal = self.pair_counts()
        return int(read) / causal

    def pair_counts(self) -> tuple[int | torch.Tensor, int]:
        """(query, key) pairs the index reads (on an accelerator a 0-d tensor there, as
        ``index_pair_counts``), and causal pairs, summed over heads."""
        return index_pair_counts(self.ranges, self.cols, self.row_positions(), self.block_q)


def rows_mask(ranges: torch.Tensor, cols: torch.Tensor, row_pos: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[H, n, num_keys]`` bool for ``n`` query rows, given each row's ranges ``[H, n, NR, 2]``,
    columns ``[H, n, NC]`` and position ``[n]``: what the index reads, causal on top."""
    heads, n = ranges.shape[:2]
    rng = ranges.long().clamp(0, num_keys)
    # Coverage by a difference array: +1 where a range starts, -1 where it ends.
    edges = torch.zeros(heads, n, num_keys + 1, dtype=torch.int32)
    nonempty = (rng[..., 1] > rng[..., 0]).int()
    edges.scatter_add_(2, rng[..., 0], nonempty).scatter_add_(2, rng[..., 1], -nonempty)
    keep = edges.cumsum(2)[..., :num_keys] > 0
    c = cols.long()
    hit = torch.zeros(heads, n, num_keys + 1, dtype=torch.bool)
    hit.scatter_(2, torch.where((c < 0) | (c >= num_keys), num_keys, c), True)
    keep |= hit[..., :num_keys]
    return keep & (torch.arange(num_keys)[None, :] <= row_pos[:, None])


def index_pair_counts(ranges: torch.Tensor, cols: torch.Tensor, row_pos: torch.Tensor, block_q: int,
                      first_block: int = 0, has_cols: bool | None = None) -> tuple[int | torch.Tensor, int]:
    """(read, causal) (query, key) pairs summed over heads, for query rows at ``row_pos`` (ascending)
    in index blocks ``first_block, first_block + 1, ...`` of ``block_q`` rows. Ranges and columns of
    one block never overlap (the index builders drop columns inside ranges). Counted a few blocks at
    a time, so that a 128K-token index needs no more memory than a short one; on the index's device.
    ``causal`` is counted where ``row_pos`` lives; on an accelerator ``read`` stays there as a 0-d
    tensor (reading it back would stall the stream every layer; sum it and read it when reporting)."""
    heads, device = ranges.shape[0], ranges.device
    n = len(row_pos)
    blocks = -(-n // block_q)
    causal = int((row_pos.long() + 1).sum()) * heads
    pos = row_pos.to(device=device, dtype=torch.long)
    col = cols[:, first_block:first_block + blocks]  # [H, R, NC]
    if has_cols is None:
        has_cols = device.type != "cpu" or bool((col >= 0).any())
    rows = block_q if blocks > 1 else n  # (a decode's one block may be nominally huge)
    step = max(1, _COUNT_ELEMENTS // (heads * (rows * 2 * ranges.shape[2] + col.shape[2])))
    read = torch.zeros((), dtype=torch.long, device=device)
    for b0 in range(0, blocks, step):
        b1 = min(blocks, b0 + step)
        part = pos[b0 * rows:b1 * rows]
        rng = ranges[:, first_block + b0 + torch.arange(len(part), device=device) // rows].long()  # [H, part, NR, 2]
        visible_end = torch.minimum(rng[..., 1], part[None, :, None] + 1)
        read += (visible_end - rng[..., 0].clamp(min=0)).clamp(min=0).sum()
        if has_cols:
            read += _column_pairs(col[:, b0:b1].long(), part, rows, heads)
    return (int(read) if device.type == "cpu" else read), causal


_COUNT_ELEMENTS = 1 << 24  # per chunk of blocks that index_pair_counts holds at once


def _column_pairs(col: torch.Tensor, pos: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """Pairs read through the columns ``col`` [H, blocks, NC] of consecutive blocks of ``rows`` rows at
    positions ``pos``: a column is read by the rows of its block at or after it."""
    blocks = col.shape[1]
    padded = torch.full((blocks * rows,), 1 << 62, dtype=torch.long, device=col.device)
    padded[:len(pos)] = pos
    block_pos = padded.view(blocks, rows)  # ascending per block
    before = torch.searchsorted(block_pos[None].expand(heads, -1, -1).contiguous(), col.contiguous())
    rows_in_block = torch.clamp(len(pos) - torch.arange(blocks, device=col.device) * rows, max=rows)
    return torch.where(col >= 0, rows_in_block[None, :, None] - before, 0).sum()


def _no_cols(heads: int, blocks: int) -> torch.Tensor:
    return torch.full((heads, blocks, 1), -1, dtype=torch.int32)


def _block_rows(q_len: int, prefix: int, block_q: int, positions: torch.Tensor | None):
    probe = SparseIndex(torch.zeros(1, 1, 1, 2, dtype=torch.int32), _no_cols(1, 1), q_len, prefix, block_q, positions)
    return probe.block_rows()


def dense_index(heads: int, q_len: int, prefix: int = 0, block_q: int = DEFAULT_BLOCK_Q,
                positions: torch.Tensor | None = None) -> SparseIndex:
    _, last = _block_rows(q_len, prefix, block_q, positions)
    ranges = torch.stack([torch.zeros_like(last), last + 1], -1)[None, :, None].expand(heads, -1, -1, -1)
    return SparseIndex(ranges.int().contiguous(), _no_cols(heads, len(last)), q_len, prefix, block_q, positions)


def streaming_index(heads: int, q_len: int, sink: int, local: int, prefix: int = 0,
                    block_q: int = DEFAULT_BLOCK_Q, positions: torch.Tensor | None = None) -> SparseIndex:
    """A-shape at block granularity: the first ``sink`` keys plus the last ``local`` keys of each
    block's first query (so later rows of a block read up to ``block_q - 1`` keys more). For the
    exact per-query window, use a window read (``fastctx.kernels.attention.Read.window``)."""
    if sink < 0 or local < 1:
        raise ValueError(f"streaming needs sink >= 0 and local >= 1, got sink={sink} local={local}")
    first, last = _block_rows(q_len, prefix, block_q, positions)
    local_start = (first - local + 1).clamp(min=0)
    sink_end = torch.minimum(torch.full_like(first, sink), local_start)
    ranges = torch.stack([torch.stack([torch.zeros_like(first), sink_end], -1),
                          torch.stack([local_start, last + 1], -1)], 1)  # [R, 2, 2]
    ranges = ranges[None].expand(heads, -1, -1, -1).int().contiguous()
    return SparseIndex(ranges, _no_cols(heads, len(first)), q_len, prefix, block_q, positions)


# Off the CPU, the slash ranges' width is a bound known on the host while that index stays under this many
# slots; past it the exact width is read back from the device (one scalar per layer) to save the memory.
SLASH_SLOTS_WITHOUT_READ = 1 << 23


def range_slots(last_slot: torch.Tensor, bound: int, read_back: bool = False) -> int:
    """How many range slots an index needs, from each row's ``last_slot`` (0-based): counted exactly on
    the CPU, where reading it is free and a narrower index is a faster kernel loop; elsewhere ``bound``
    (known on the host, so no device round trip) unless ``read_back``."""
    if last_slot.device.type == "cpu" or read_back:
        return int(last_slot.max()) + 1
    return bound


def _slash_groups(group: torch.Tensor, keys: int, rows: int, blocks: int) -> int:
    """How many merged diagonal groups to make room for: a bound off the CPU (merged groups lie more than
    ``rows`` offsets apart among ``keys`` offsets) unless that index would be too large."""
    heads, slashes = group.shape
    bound = min(slashes, 1 + (keys - 1) // (rows + 1))
    return range_slots(group[:, -1], bound, read_back=heads * blocks * bound > SLASH_SLOTS_WITHOUT_READ)


def _slash_ranges(offsets: torch.Tensor, first: torch.Tensor, last: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
    """``[H, R, G, 2]`` ranges of blocks of ``rows`` rows (``first``/``last`` ``[R]``) from diagonal
    ``offsets`` ``[H, NS]`` (of ``keys`` keys) sorted descending: diagonals whose key intervals touch
    merge into one."""
    heads, on = offsets.shape[0], {"device": offsets.device, "dtype": torch.long}
    gap = (offsets[:, :-1] - offsets[:, 1:]) > rows
    group = torch.cat([torch.zeros(heads, 1, **on), gap.long().cumsum(1)], 1)
    groups = _slash_groups(group, keys, rows, len(first))
    smax = torch.full((heads, groups), -1, **on).scatter_reduce(1, group, offsets, "amax")
    smin = torch.full((heads, groups), 1 << 40, **on).scatter_reduce(1, group, offsets, "amin")
    start = (first[None, :, None] - smax[:, None]).clamp(min=0)  # [H, R, G]
    end = last[None, :, None] - smin[:, None] + 1
    # Groups beyond a block's causal reach (the largest offsets, so a prefix) read nothing;
    # unused group slots go last so that each block's starts stay ascending.
    empty = end <= start
    start, end = torch.where(empty, 0, start), torch.where(empty, 0, end)
    unused = (smax < 0)[:, None].expand_as(start)
    return torch.stack([start.masked_fill(unused, _EMPTY), end.masked_fill(unused, _EMPTY)], -1)


def vertical_slash_index(vertical: torch.Tensor, slash: torch.Tensor, q_len: int, prefix: int = 0,
                         block_q: int = DEFAULT_BLOCK_Q) -> SparseIndex:
    """MInference's vertical-slash layout as ranges + columns.

    ``vertical`` ``[H, NV]``: key positions read by every query. ``slash``
    ``[H, NS]``: diagonal offsets (query position - key position >= 0) read by
    every query. Per query block, diagonals whose key intervals touch are
    merged into one contiguous range (as MInference's index converter does);
    verticals already inside a range are dropped from the columns. Built on the inputs' device.
    """
    heads, device = vertical.shape[0], vertical.device
    if slash.shape[0] != heads:
        raise ValueError(f"vertical and slash must have the same heads, got {vertical.shape} and {slash.shape}")
    first, last = _block_rows(q_len, prefix, block_q, None)
    sizes = last - first + 1  # on the host, as the blocks' selections below: no device round trip
    offsets = slash.long().clamp(min=0).sort(1, descending=True).values  # repeats merge as touching
    parts = []
    for rows in sizes.unique().tolist():  # full blocks, then a shorter last block
        sel = (sizes == rows).nonzero().flatten()
        parts.append((sel.to(device), _slash_ranges(offsets, first[sel].to(device), last[sel].to(device), rows,
                                                    prefix + q_len)))
    first, last = first.to(device), last.to(device)
    ranges = torch.full((heads, len(first), max(r.shape[2] for _, r in parts), 2), _EMPTY, dtype=torch.long,
                        device=device)
    for sel, r in parts:
        ranges[:, sel, : r.shape[2]] = r
    verts = vertical.long().sort(1).values  # [H, NV]
    repeat = torch.cat([torch.zeros(heads, 1, dtype=torch.bool, device=device), verts[:, 1:] == verts[:, :-1]], 1)
    at = torch.searchsorted(ranges[..., 0].contiguous(),
                            verts[:, None].expand(-1, len(first), -1).contiguous(), right=True) - 1
    covered = (at >= 0) & (verts[:, None] < ranges[..., 1].gather(2, at.clamp(min=0)))
    drop = covered | (verts[:, None] > last[None, :, None]) | (repeat | (verts < 0))[:, None]
    cols = torch.where(drop, -1, verts[:, None])
    return SparseIndex(ranges.int(), cols.int(), q_len, prefix, block_q)


def tree_index(ancestors: torch.Tensor, context: int, heads: int) -> SparseIndex:
    """A token tree's verification read (speculative decoding): ``n`` nodes whose K/V follow
    ``context`` tokens in node order (parents before children), node ``i`` reading the whole
    context and the nodes ``j`` with ``ancestors[i, j]`` (itself and its ancestors, ``[n, n]``
    bool). One block per node: its range is the context, its columns the marked nodes."""
    n = ancestors.shape[0]
    if ancestors.shape != (n, n) or not bool(ancestors.diagonal().all()) or bool(ancestors.triu(1).any()):
        raise ValueError(f"a tree's mask must be [n, n] with each node marking itself and only earlier nodes "
                         f"(parents come first), got shape {tuple(ancestors.shape)}")
    nodes = torch.arange(n, dtype=torch.int32) + context
    cols = torch.where(ancestors.cpu(), nodes, -1)
    ranges = torch.tensor([0, context], dtype=torch.int32).expand(n, 1, 2)
    return SparseIndex(ranges.expand(heads, -1, -1, -1).contiguous(), cols.expand(heads, -1, -1).contiguous(),
                       n, context, block_q=1)


def reference_sparse_prefill_attention(q, k_new, v_new, k_prefix=None, v_prefix=None, *,
                                       index: SparseIndex, scale: float | None = None) -> torch.Tensor:
    k, v, _ = joined_chunk(q, k_new, v_new, k_prefix, v_prefix, index)
    return reference_attention_rows(q, k, v, index.row_positions(), index.mask(), scale)


def reference_attention_rows(q, k, v, row_pos: torch.Tensor, mask: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """Softmax attention in float32 of queries at positions ``row_pos`` over keys ``0 .. Tk-1``,
    causal, further restricted by ``mask`` (``[H or 1, Tq, Tk]`` bool, True = read) if given."""
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[0] // k.shape[0]
    scores = torch.einsum("htd,hsd->hts", q.float(), k.float().repeat_interleave(group, 0)) * scale
    keep = torch.arange(k.shape[1])[None] <= row_pos.long()[:, None]
    if mask is not None:
        keep = keep & mask
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("hts,hsd->htd", probs, v.float().repeat_interleave(group, 0)).to(q.dtype)


def reference_sparse_rows(q, k, v, *, index: SparseIndex, rows: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """The reference output of selected query ``rows`` only (``k``/``v`` include the prefix).

    For checking long sequences, where the full ``[H, Tq, Tk]`` mask would not fit in memory.
    """
    return reference_attention_rows(q[:, rows], k, v, index.row_positions()[rows], index.mask(rows), scale)


def attention_recall(q, k, *, index: SparseIndex, rows: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``[H]``: share of each head's dense softmax mass (over query ``rows``) that ``index`` covers.

    ``k`` includes the prefix; rows are 0-based within the chunk.
    """
    _check(q, k, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[0] // k.shape[0]
    scores = torch.einsum("htd,hsd->hts", q[:, rows].float(), k.float().repeat_interleave(group, 0)) * scale
    causal = torch.arange(k.shape[1])[None] <= index.row_positions()[rows][:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return (probs * index.mask(rows)).sum(-1).mean(-1)


def sparse_prefill_attention_varlen(q, k, v, cu_seqlens: list[int], indexes: list[SparseIndex], *,
                                    scale: float | None = None) -> torch.Tensor:
    """A ragged batch: ``q`` ``[H, T, D]`` and ``k``/``v`` ``[Hkv, T, D]`` hold the sequences
    back to back, sequence ``i`` in tokens ``cu_seqlens[i]:cu_seqlens[i+1]``, each with its index."""
    if len(indexes) != len(cu_seqlens) - 1:
        raise ValueError(f"{len(cu_seqlens) - 1} sequences but {len(indexes)} indexes")
    out = torch.empty_like(q)
    for index, start, end in zip(indexes, cu_seqlens, cu_seqlens[1:]):
        out[:, start:end] = sparse_prefill_attention(q[:, start:end], k[:, start:end], v[:, start:end],
                                                     index=index, scale=scale)
    return out


def joined_chunk(q, k_new, v_new, k_prefix, v_prefix, index: SparseIndex):
    """All keys/values of a chunk and its prefix length, checked against ``index``.

    The prefix is whatever precedes the chunk's ``q_len`` keys, so callers that
    already hold the joined K/V pass them as ``k_new``/``v_new`` without a copy.
    With explicit positions, the keys are everything up to the last query.
    """
    k, v, _ = _join_prefix(k_new, v_new, k_prefix, v_prefix)
    _check(q, k, v)
    if index.positions is None:
        prefix = k.shape[1] - q.shape[1]
        ok = (index.q_len, index.prefix) == (q.shape[1], prefix)
    else:
        prefix = index.prefix
        ok = index.q_len == q.shape[1] and index.num_keys == k.shape[1]
    if not ok or index.ranges.shape[0] != q.shape[0]:
        raise ValueError(f"index is for {index.ranges.shape[0]} heads, q_len={index.q_len}, "
                         f"prefix={index.prefix}; got q{tuple(q.shape)} with {k.shape[1]} keys")
    return k, v, prefix


def sparse_prefill_attention(q, k_new, v_new, k_prefix=None, v_prefix=None, *,
                             index: SparseIndex, scale: float | None = None) -> torch.Tensor:
    """Sparse causal attention of one chunk (``[H, Tq, D]`` queries, ``[Hkv, Tk, D]`` keys): the C++
    kernel on CPU, the Triton kernel on CUDA, the reference where neither can run."""
    from fastctx.kernels import attention

    k, v, _ = joined_chunk(q, k_new, v_new, k_prefix, v_prefix, index)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda and attention.why_not_triton_sparse(q, index) is None:
        from fastctx.kernels.sparse_triton import sparse_prefill_attention_triton

        return sparse_prefill_attention_triton(q, k, v, index=index, scale=scale)
    out = torch.empty_like(q)
    positions = None if index.positions is None else index.positions.to(torch.int32).contiguous()
    attention.paged_attention(
        q.transpose(0, 1), attention.PagedKV.contiguous(k, v), attention.single_block_table(q.device),
        [0, q.shape[1]], [k.shape[1]], [attention.Read.indexed(index)], scale=scale,
        positions=positions, out=out.transpose(0, 1))
    return out


def block_mask_index(block_mask: torch.Tensor, block_k: int, q_len: int, prefix: int = 0,
                     block_q: int | None = None) -> SparseIndex:
    """Block-sparse layout: ``block_mask[h, r, b]`` says query block ``r`` reads key block ``b``.

    Key blocks are aligned at absolute positions (``[b * block_k, (b + 1) * block_k)``);
    query blocks are ``block_q`` (default ``block_k``) rows of the chunk. Runs of
    adjacent key blocks become one range.
    """
    block_q = block_k if block_q is None else block_q
    heads, blocks, nkb = block_mask.shape
    if blocks != -(-q_len // block_q):
        raise ValueError(f"block_mask has {blocks} query blocks, expected ceil({q_len}/{block_q})")
    m = block_mask.bool()
    device = m.device
    pad = torch.zeros(heads, blocks, 1, dtype=torch.bool, device=device)
    run_start = m & ~torch.cat([pad, m[..., :-1]], -1)
    run_end = m & ~torch.cat([m[..., 1:], pad], -1)
    slot = torch.cumsum(run_start.long(), -1) - 1  # run number of each block
    width = max(1, range_slots(slot[..., -1], -(-nkb // 2)))  # runs are apart: at most ceil(NKB / 2)
    kb = torch.arange(nkb, device=device).expand(heads, blocks, -1)
    ranges = []
    for edge, value in ((run_start, kb * block_k), (run_end, (kb + 1) * block_k)):
        # Blocks that are not this edge of a run write to a spare last slot, dropped after.
        at = torch.where(edge, slot, width)
        ranges.append(torch.full((heads, blocks, width + 1), _EMPTY, dtype=torch.long, device=device)
                      .scatter_(2, at, torch.where(edge, value, _EMPTY))[..., :width])
    return SparseIndex(torch.stack(ranges, -1).int(), _no_cols(heads, blocks).to(device), q_len, prefix, block_q)


def concat_heads(indexes: list[SparseIndex]) -> SparseIndex:
    """One index over the heads of several (same chunk and block size), in order."""
    first = indexes[0]
    if any((i.q_len, i.prefix, i.block_q) != (first.q_len, first.prefix, first.block_q)
           or (i.positions is None) != (first.positions is None) for i in indexes):
        raise ValueError("indexes to concatenate must share q_len, prefix, positions and block_q")
    nr = max(i.ranges.shape[2] for i in indexes)
    nc = max(i.cols.shape[2] for i in indexes)
    ranges = torch.cat([torch.nn.functional.pad(i.ranges, (0, 0, 0, nr - i.ranges.shape[2]), value=_EMPTY)
                        for i in indexes])
    cols = torch.cat([torch.nn.functional.pad(i.cols, (0, nc - i.cols.shape[2]), value=-1) for i in indexes])
    return SparseIndex(ranges, cols, first.q_len, first.prefix, first.block_q, first.positions)
