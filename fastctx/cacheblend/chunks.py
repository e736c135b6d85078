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


def chunk_lead(token_ids: Sequence[int], spans: Sequence[tuple[int, int]], separator: Sequence[int],
               context: str) -> list[int]:
    """What a chunk is prefilled after when it is first stored (its key covers it too).

    ``"separator"``: the separator alone, so a chunk is shared by prompts whatever precedes it, and its
    first token is not the attention sink a sequence's first token becomes. ``"prompt_head"``: the
    prompt's opening up to its first chunk that does not open the prompt (an opening long enough to be
    a chunk itself belongs to the head), as CacheBlend precomputes chunks after the system prompt: the
    stored KV has seen the same sink and instructions as in the prompt, and is shared only by prompts
    with the same opening. Falls back to the separator when the prompt has no such opening."""
    if context == "prompt_head" and spans:
        opening = spans[1][0] if spans[0][0] == 0 and len(spans) > 1 else spans[0][0]
        if opening:
            return list(token_ids[:opening])
    return list(separator)
