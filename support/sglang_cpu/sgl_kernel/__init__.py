"""A pure-PyTorch stand-in for the few ``sgl_kernel`` CPU ops SGLang calls on a CPU without them.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports ``sgl_kernel`` at import time, but
the CPU build of sgl-kernel is not on PyPI (the ``sglang-kernel`` wheel holds CUDA ops only)
and its source build targets Xeons with AVX-512/AMX. This module provides what plain
generation and speculative verification call on CPU (the tree metadata in ``speculative``),
each following the Triton kernel beside its call site; every other name resolves to a stub
that raises when called (SGLang imports many names it never calls on this path). For development and CI on CPUs only:
it is slow where the real kernels are fast, and it is not used when a real ``sgl_kernel``
is installed.
"""

from __future__ import annotations

import torch


def _spans(start: torch.Tensor, end: torch.Tensor):
    """(row, start, end, offset into the packed locations) per request, on the host."""
    offset = 0
    for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
        yield i, s, e, offset
        offset += e - s


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 _width: int) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]]`` = the next ``end[i] - start[i]`` of
    ``out_cache_loc`` (packed request after request)."""
    rows = req_pool_indices.tolist()
    for i, s, e, off in _spans(start_offset, end_offset):
        req_to_token[rows[i], s:e] = out_cache_loc[off:off + e - s].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 _width: int) -> None:
    """The inverse: packs ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` into ``out_cache_loc``."""
    rows = req_pool_indices.tolist()
    for i, s, e, off in _spans(start_offset, end_offset):
        out_cache_loc[off:off + e - s] = req_to_token[rows[i], s:e].to(out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """Copies rows ``src_loc`` to rows ``tgt_loc`` in every layer's K and V buffer, given as raw
    pointers with their row strides in bytes (as the Triton kernel takes them)."""
    if tgt_loc.numel() == 0:
        return
    src, tgt = src_loc.long().cpu(), tgt_loc.long().cpu()
    rows = int(max(src.max(), tgt.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        buf = _bytes_at(ptr, rows * stride).view(rows, stride)
        buf[tgt] = buf[src].clone()


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Packs ``out_cache_loc[i]`` for the entries ``i`` of ``accept_index`` that are not -1, in order."""
    kept = accept_index.flatten()
    kept = kept[kept != -1].long()
    accept_out_cache_loc[:len(kept)] = out_cache_loc[kept].to(accept_out_cache_loc.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                           retrive_next_sibling, target_predict) -> None:
    """Greedy verification of each request's draft tree (in place): from the root, follow the child
    whose token is the target's argmax after the last accepted node, until none is;
    ``predicts[node]`` is the token after each accepted node (the last one's is the target's)."""
    n = candidates.shape[1]
    for b in range(candidates.shape[0]):
        target, draft = target_predict[b].tolist(), candidates[b].tolist()
        after, sibling = retrive_next_token[b].tolist(), retrive_next_sibling[b].tolist()
        last, accepted, node = 0, 0, 0
        accept_index[b, 0] = retrive_index[b, 0]
        while accepted < n - 1:
            node = after[node]
            while node != -1 and draft[node] != target[last]:
                node = sibling[node]
            if node == -1:
                break
            predicts[retrive_index[b, last]] = target[last]
            accepted += 1
            accept_index[b, accepted] = retrive_index[b, node]
            last = node
        accept_token_num[b] = accepted
        predicts[retrive_index[b, last]] = target[last]


def _bytes_at(ptr: int, nbytes: int) -> torch.Tensor:
    import ctypes

    array = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(array, dtype=torch.uint8, count=nbytes)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*_args, **_kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} has no CPU stand-in (support/sglang_cpu); "
                                  f"install a real sgl-kernel CPU build for this path")

    missing.__name__ = name
    return missing
