"""K/V where engines keep them: fixed-size blocks, reached through a block table.

``PagedKV`` holds K and V as logical ``[blocks, kv_heads, block_size, head_dim]``
tensors with whatever strides the engine's layout gives them (vLLM's CPU cache
keeps K dims-major inside a block; a CUDA cache keeps tokens outermost). Kernels
read the strides, so no layout is copied into another. Plain contiguous
``[kv_heads, tokens, head_dim]`` K/V are one block of ``tokens``.

``SeqKV`` is one sequence's keys: the cache, its block-table row and its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedKV:
    key: torch.Tensor  # logical [blocks, kv_heads, block_size, head_dim]
    value: torch.Tensor

    def __post_init__(self):
        if self.key.dim() != 4 or self.key.shape != self.value.shape:
            raise ValueError(f"PagedKV needs K and V as [blocks, kv_heads, block_size, head_dim], got "
                             f"{tuple(self.key.shape)} and {tuple(self.value.shape)}")

    @classmethod
    def contiguous(cls, k: torch.Tensor, v: torch.Tensor) -> PagedKV:
        """``[kv_heads, tokens, head_dim]`` K/V as a cache of one block (block table ``[[0]]``)."""
        if k.dim() != 3 or k.shape != v.shape:
            raise ValueError(f"expected K and V as [kv_heads, tokens, head_dim], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        return cls(k.unsqueeze(0), v.unsqueeze(0))

    @property
    def block_size(self) -> int:
        return self.key.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def head_dim(self) -> int:
        return self.key.shape[3]

    def gather(self, table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous copy of one sequence's first ``length`` K and V, each ``[kv_heads, length, head_dim]``:
        the reference reader, and the fallback of paths that need contiguous keys."""
        return self.read_range(self.key, table_row, 0, length), self.read_range(self.value, table_row, 0, length)

    def read_range(self, t: torch.Tensor, table_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """A copy of positions ``start..end-1`` of one sequence in ``t`` (``self.key`` or ``self.value``),
        ``[kv_heads, end - start, head_dim]``, reading only the blocks that hold them."""
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        flat = t[table_row[first:last].long()].transpose(0, 1).reshape(self.kv_heads, (last - first) * bs,
                                                                         self.head_dim)
        return flat[:, start - first * bs:end - first * bs]


def single_block_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(1, 1, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class SeqKV:
    """One sequence's keys and values: ``length`` tokens of ``kv`` through ``table_row``."""

    kv: PagedKV
    table_row: torch.Tensor  # int32 [max_blocks]
    length: int

    @classmethod
    def contiguous(cls, k: torch.Tensor, v: torch.Tensor | None = None) -> SeqKV:
        return cls(PagedKV.contiguous(k, k if v is None else v), single_block_table(k.device)[0], k.shape[1])

    @property
    def kv_heads(self) -> int:
        return self.kv.kv_heads

    @property
    def head_dim(self) -> int:
        return self.kv.head_dim

    @property
    def device(self) -> torch.device:
        return self.kv.key.device

    def is_contiguous_block(self) -> bool:
        """Whether the keys are one plain ``[kv_heads, length, head_dim]`` tensor (``keys()`` is then a view)."""
        key = self.kv.key
        return key.shape[0] == 1 and key[0].is_contiguous() and key.shape[2] == self.length

    def keys(self) -> torch.Tensor:
        return self.kv.key[0] if self.is_contiguous_block() else self.kv.gather(self.table_row, self.length)[0]

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.gather(self.table_row, self.length)


def as_seq(k: torch.Tensor | SeqKV) -> SeqKV:
    """Estimators take a sequence's keys as ``[kv_heads, tokens, head_dim]`` or as a ``SeqKV``."""
    return k if isinstance(k, SeqKV) else SeqKV.contiguous(k)
