"""Where a prompt's reusable chunks are: between separator tokens, or as the request says."""

from __future__ import annotations

from collections.abc import Sequence


class ChunkSpanError(ValueError):
    """Bad per-request chunk boundaries; the message says what to send."""


def split_on_separator(token_ids: Sequence[int], separator: Sequence[int], min_tokens: int) -> list[tuple[int, int]]:
    """Spans ``[start, end)`` of the pieces between occurrences of ``separator`` (the separators themselves
    are in no span), keeping pieces of at least ``min_tokens``. The last piece (what follows the final
    separator: the question) is never a chunk."""
    sep = list(separator)
    if not sep:
        return []
    ids = list(token_ids)
    spans, start, i, w = [], 0, 0, len(sep)
    first = sep[0]
    while i <= len(ids) - w:
        if ids[i] == first and ids[i:i + w] == sep:
            if i - start >= min_tokens:
                spans.append((start, i))
            i += w
            start = i
        else:
            i += 1
    return spans


def spans_from_request(value, num_tokens: int, min_tokens: int) -> list[tuple[int, int]]:
    """Chunk spans passed in ``kv_transfer_params["chunks"]``: ``[[start, end], ...]`` token offsets,
    ascending and disjoint; spans shorter than ``min_tokens`` are dropped."""
    if not isinstance(value, (list, tuple)):
        raise ChunkSpanError(f'kv_transfer_params["chunks"] must be a list of [start, end] token offsets, '
                             f"got {type(value).__name__}")
    spans, last = [], 0
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ChunkSpanError(f'kv_transfer_params["chunks"]: each chunk is [start, end] (two ints), got {item!r}')
        start, end = item
        if not last <= start < end <= num_tokens:
            raise ChunkSpanError(
                f'kv_transfer_params["chunks"]: chunk {item!r} must satisfy previous end ({last}) <= start < end '
                f"<= prompt length ({num_tokens}); send ascending, disjoint token offsets")
        if end - start >= min_tokens:
            spans.append((start, end))
        last = end
    return spans
