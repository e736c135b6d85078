"""One layer of causal attention over vLLM's CPU paged cache: vLLM's kernel vs fastctx's, side by side.

Same threads, same random q/k/v (SmolLM2 shapes: 9 query heads, 3 KV heads,
head_dim 64) written once into a vLLM CPU cache (block 128, scattered blocks)
with vLLM's own writer. Timed on it:

- ``vllm``: vLLM's ``cpu_attention_with_kv_cache``;
- ``fastctx_dense``: fastctx's batch kernel with a dense read, K/V read in place;
- ``sparse_at_1``: the same kernel through a sparse index that lists every key;
- ``gather_sdpa``: what fastctx did before reading in place: copy the context
  out of the cache, then torch SDPA (merging prefix and chunk by log-sum-exp).

Cases are a fresh prefill of N tokens, or a chunk of C tokens after a cached
prefix of P (chunked prefill, prefix-cache hits; C = 5 is a speculative-decoding
verification of 4 drafts). Error is the largest absolute
difference from the float32 reference on 128 sampled query rows. The last line
printed is one JSON object.

    python benchmarks/attention_kernels.py --quick        # 8K fresh; 512 and 5 tokens after a 4K prefix
    python benchmarks/attention_kernels.py --cases 0:2048 0:4096 0:8192 0:16384 4096:512 4096:4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastctx.kernels.attention import Read, paged_attention
from fastctx.kernels.dense import prefill_attention
from fastctx.kernels.paged import PagedKV
from fastctx.kernels.sparse import dense_index, reference_attention_rows

BLOCK = 128


def best_ms(fn, reps: int, warmup: bool = True) -> float:
    """Fastest of ``reps`` timed calls, in milliseconds (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def vllm_isa(dtype: torch.dtype) -> str:
    """The ISA vLLM's CPU backend picks for this dtype here: AMX tiles for bf16 on AMX hosts."""
    from fastctx.kernels._cpu_ext import cpu_features

    return "amx" if dtype == torch.bfloat16 and cpu_features()["amx_bf16"] else "vec"


def vllm_cache(k: torch.Tensor, v: torch.Tensor, seed: int = 0, isa: str = "vec"):
    """``k``/``v`` ``[tokens, Hkv, D]`` written by vLLM into a CPU cache in scattered blocks, in the
    layout of ``isa``: (kv_cache, key_cache, value_cache, block table row)."""
    from vllm import _custom_ops as ops

    tokens, kv_heads, dim = k.shape
    blocks = -(-tokens // BLOCK)
    table = torch.randperm(blocks + 4, generator=torch.Generator().manual_seed(seed))[:blocks].int()
    cache = torch.zeros(blocks + 4, kv_heads, BLOCK, 2 * dim, dtype=k.dtype)
    key_cache, value_cache = cache.view(blocks + 4, kv_heads, 2 * BLOCK, dim).chunk(2, dim=2)
    slots = table.long()[torch.arange(tokens) // BLOCK] * BLOCK + torch.arange(tokens) % BLOCK
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return cache, key_cache, value_cache, table[None]


def vllm_kernel(q, key_cache, value_cache, table, chunk: int, prefix: int, scale: float, out=None, isa="vec"):
    """A closure running vLLM's ``cpu_attention_with_kv_cache`` for one request over a cache in ``isa``'s
    layout."""
    from vllm import _custom_ops as ops

    total = prefix + chunk
    qsl = torch.tensor([0, chunk], dtype=torch.int32)
    seq_lens = torch.tensor([total], dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=q.shape[1], num_kv_heads=key_cache.shape[1], head_dim=q.shape[2], seq_lens=seq_lens,
        dtype=q.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True,
        dynamic_causal=None, kv_cache_dtype="auto")
    out = torch.empty_like(q) if out is None else out
    return lambda: ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
        softcap=0, scheduler_metadata=sched, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto")


def measure(prefix: int, chunk: int, reps: int, dtype: torch.dtype) -> dict:
    from fastctx.vllm_plugin.paged_kv import cpu_paged_kv

    total = prefix + chunk
    g = torch.Generator().manual_seed(total)
    q = torch.randn(chunk, 9, 64, generator=g).to(dtype)
    k, v = (torch.randn(total, 3, 64, generator=g).to(dtype) for _ in range(2))
    # vLLM's kernel over its own layout for this dtype (AMX tiles for bf16 on AMX hosts); fastctx
    # reads the "vec" layout its backend keeps.
    isa = vllm_isa(dtype)
    _, vllm_key, vllm_value, vllm_table = vllm_cache(k, v, isa=isa)
    cache, key_cache, value_cache, table = vllm_cache(k, v)
    kv = cpu_paged_kv(cache)
    scale = 64 ** -0.5
    outs = {name: torch.empty_like(q) for name in ("vllm", "fastctx_dense", "sparse_at_1")}
    every_key = Read.indexed(dense_index(9, chunk, prefix))

    def gather_sdpa():
        kc, vc = PagedKV.gather(kv, table[0], total)
        return prefill_attention(q.transpose(0, 1), kc[:, prefix:], vc[:, prefix:], kc[:, :prefix],
                                 vc[:, :prefix], scale=scale).transpose(0, 1)

    runs = {
        "vllm": vllm_kernel(q, vllm_key, vllm_value, vllm_table, chunk, prefix, scale, outs["vllm"], isa),
        "fastctx_dense": lambda: paged_attention(q, kv, table, [0, chunk], [total], [Read.DENSE], scale=scale,
                                                 out=outs["fastctx_dense"]),
        "sparse_at_1": lambda: paged_attention(q, kv, table, [0, chunk], [total], [every_key], scale=scale,
                                               out=outs["sparse_at_1"]),
        "gather_sdpa": gather_sdpa,
    }
    ms = {name: best_ms(fn, reps) for name, fn in runs.items()}
    outs["gather_sdpa"] = gather_sdpa()
    rows = torch.randperm(chunk, generator=g)[:128]
    # float32 inputs: the reference stays float32 (not rounded to the kernels' bf16 output)
    want = reference_attention_rows(q[rows].float().transpose(0, 1), k.float().transpose(0, 1),
                                    v.float().transpose(0, 1), prefix + rows, scale=scale).transpose(0, 1)
    err = {name: float((out[rows].float() - want.float()).abs().max()) for name, out in outs.items()}
    row = {"prefix": prefix, "chunk": chunk, "vllm_isa": isa, **{f"{n}_ms": round(t, 2) for n, t in ms.items()},
           "speedup_vs_vllm_dense": round(ms["vllm"] / ms["fastctx_dense"], 3),
           "speedup_vs_vllm_sparse_at_1": round(ms["vllm"] / ms["sparse_at_1"], 3),
           "in_place_vs_gather": round(ms["gather_sdpa"] / ms["fastctx_dense"], 3),
           **{f"err_{n}": float(f"{e:.2e}") for n, e in err.items()}}
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0:8192, 4096:512 and 4096:5, 3 reps")
    parser.add_argument("--cases", nargs="+",
                        default=["0:2048", "0:4096", "0:8192", "4096:512", "4096:4096", "4096:5"],
                        help="PREFIX:CHUNK token counts")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default: the dtype stock vLLM is fastest at on this CPU (bf16 with AVX512-BF16)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.reps = ["0:8192", "4096:512", "4096:5"], 3
    torch.set_num_threads(args.threads)
    from engines import fast_dtype, machine  # noqa: E402  (benchmarks/ is on sys.path)

    args.dtype = args.dtype or fast_dtype()
    dtype = getattr(torch, args.dtype)
    if hasattr(torch._C, "_cpu") and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()  # vLLM's AMX kernel needs the process's AMX permission (its workers ask too)
    from fastctx.kernels.attention import kernel_path

    rows = []
    print(f"threads={args.threads} dtype={args.dtype}")
    for case in args.cases:
        prefix, chunk = map(int, case.split(":"))
        rows.append(measure(prefix, chunk, args.reps, dtype))
        print(json.dumps(rows[-1]), flush=True)
    fresh = [r for r in rows if r["prefix"] == 0]
    head = max(fresh, key=lambda r: r["chunk"]) if fresh else rows[-1]
    result = {"tokens": head["prefix"] + head["chunk"], "dtype": args.dtype, "threads": args.threads,
              "fastctx_path": kernel_path(dtype, 64),
              "speedup_vs_vllm_dense": head["speedup_vs_vllm_dense"],
              "speedup_vs_vllm_sparse_at_1": head["speedup_vs_vllm_sparse_at_1"], **machine(), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
