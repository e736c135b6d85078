"""CacheBlend vs full prefill vs prefix caching: TTFT on RAG prompts whose chunks come in new orders.

Three engines side by side in one run (same model, dtype, threads, prompts):
``full`` (stock vLLM, prefix caching off), ``prefix`` (stock vLLM, prefix
caching on) and ``cacheblend`` (stock vLLM with fastctx's connector at
``--ratio``, prefix caching on). A prompt is a shared system text, then
``--chunks`` documents of ``--chunk-tokens`` tokens (cut from one text by token
ids and joined by the separator's token ids, so a chunk's tokens do not depend
on its neighbours), then a question. Every engine first sees the documents
once in their natural order (that stores the chunks and fills the prefix
cache); then each of ``--orders`` reorderings, each led by a different
document, is timed on every engine in turn (TTFT = wall time of a 1-token
greedy generation).

Fidelity against ``full``, teacher-forced on the same token ids: the prompt's
tail past its last whole cache block plus ``full``'s 16-token greedy answer,
scored with prompt logprobs (top-1 agreement and KL over the top 20); prefix
caching, which reuses exact KV, is scored the same way as a control. The last
line printed is one JSON object.

    python benchmarks/cacheblend_ttft.py --quick        # 6 chunks x 512 tokens, 3 orders
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from fastctx.eval.agreement import compare
from fastctx.eval.texts import natural_text, token_ids

from engines import fast_dtype, machine, set_engine_env  # noqa: E402  (benchmarks/ is on sys.path)

SYSTEM = ("You are a careful assistant. Answer the question using only the documents below; each document "
          "is separated from the next by a line of three hashes. If the documents do not hold the answer, say "
          "so. Quote the document you rely on. ") * 2
QUESTION = "\n\nQuestion: which of the documents above speaks about the sea, and what does it say? Answer:"
ANSWER_TOKENS = 16


def generate(llm, ids, **kw):
    from vllm import SamplingParams

    return llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def ttft(llm, ids) -> float:
    start = time.perf_counter()
    generate(llm, ids, max_tokens=1)
    return time.perf_counter() - start


def span_logprobs(llm, ids, span: int) -> list[dict]:
    """Top-20 next-token logprobs at the prompt's last ``span`` positions; the prompt still reads stored
    KV (vLLM skips caches for prompt logprobs unless told not to)."""
    out = generate(llm, ids, max_tokens=1, prompt_logprobs=20, skip_reading_prefix_cache=False, detokenize=False)
    return [{t: lp.logprob for t, lp in pos.items()} for pos in out.prompt_logprobs[-span:]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 chunks of 512 tokens, 3 orders")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--orders", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.15, help="CacheBlend recompute_ratio")
    parser.add_argument("--chunk-context", choices=["separator", "prompt_head"], default="separator",
                        help="CacheBlend chunk_context: what a chunk is prefilled after when first stored")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for every engine")
    parser.add_argument("--dtype", help="engine dtype (default: the one stock vLLM is fastest at on this CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.chunk_tokens, args.orders = 6, 512, 3
    if args.chunks < 2 or args.orders > args.chunks:
        parser.error("--chunks must be >= 2 and --orders <= --chunks (each order is led by another chunk)")
    threads = set_engine_env(args.threads_bind)
    args.dtype = args.dtype or fast_dtype()
    print(f"dtype={args.dtype} {machine()}", flush=True)

    from transformers import AutoTokenizer
    from vllm import LLM

    from fastctx.cacheblend.params import BlendParams
    from fastctx.default_model import require_default_model

    model = args.model or str(require_default_model())
    tok = AutoTokenizer.from_pretrained(model)
    text = token_ids(tok, natural_text())
    need = args.chunks * args.chunk_tokens
    if len(text) < need:
        parser.error(f"the embedded text holds {len(text)} tokens; --chunks x --chunk-tokens needs {need}")
    docs = [text[i * args.chunk_tokens:(i + 1) * args.chunk_tokens] for i in range(args.chunks)]
    sep = tok.encode(BlendParams().separator, add_special_tokens=False)
    system, question = token_ids(tok, SYSTEM) + sep, sep + token_ids(tok, QUESTION)

    def prompt(order):
        ids = list(system)
        for j, d in enumerate(order):
            ids += docs[d] + (sep if j < len(order) - 1 else [])
        return ids + question

    rng = random.Random(0)
    orders = []
    for lead in rng.sample(range(1, args.chunks), args.orders):  # never the ingest order's lead
        rest = [d for d in range(args.chunks) if d != lead]
        rng.shuffle(rest)
        orders.append([lead, *rest])
    max_len = len(prompt(range(args.chunks))) + ANSWER_TOKENS + 8
    blend = {"kv_connector": "FastctxBlendConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"recompute_ratio": args.ratio, "chunk_context": args.chunk_context}}
    base = dict(model=model, dtype=args.dtype, enforce_eager=True, max_model_len=max_len, seed=0,
                worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension")
    engines = {"full": LLM(**base, enable_prefix_caching=False),
               "prefix": LLM(**base, enable_prefix_caching=True),
               "cacheblend": LLM(**base, enable_prefix_caching=True, kv_transfer_config=blend)}
    block = engines["full"].llm_engine.vllm_config.cache_config.block_size
    for llm in engines.values():  # warm-up (allocations, thread pools): a short unrelated prompt
        ttft(llm, token_ids(tok, natural_text()[-2000:]))

    ingest = prompt(range(args.chunks))
    first_sight = {name: ttft(llm, ingest) for name, llm in engines.items()}
    engines["cacheblend"].collective_rpc("fastctx_blend_stats", args=("reset",))
    times = {name: [] for name in engines}
    for order in orders:
        ids = prompt(order)
        for name, llm in engines.items():
            times[name].append(ttft(llm, ids))
    stats = engines["cacheblend"].collective_rpc("fastctx_blend_stats", args=("reset",))[0]
    stats.pop("per_request", None)

    fidelity = {"cacheblend": [], "prefix": []}  # prefix caching reuses exact KV: the control
    for order in orders:
        ids = prompt(order)
        answer = list(generate(engines["full"], ids, max_tokens=ANSWER_TOKENS).outputs[0].token_ids)
        # Positions whose hidden state is computed even where the timed request left ``ids`` cached
        # (whole blocks): vLLM returns no real prompt logprobs for cached positions.
        span = len(ids) + len(answer) - (len(ids) // block * block + 1)
        ref = span_logprobs(engines["full"], ids + answer, span)
        for name, rows in fidelity.items():
            rows.append(compare(ref, span_logprobs(engines[name], ids + answer, span)))
    med = {name: statistics.median(t) for name, t in times.items()}
    positions = sum(f["positions"] for f in fidelity["cacheblend"])

    def mean(name, key):
        return sum(f[key] * f["positions"] for f in fidelity[name]) / positions

    result = {
        "prompt_tokens": len(ingest), "chunks": args.chunks, "chunk_tokens": args.chunk_tokens,
        "orders": args.orders, "recompute_ratio": args.ratio, "chunk_context": args.chunk_context,
        **{f"ttft_{name}_s": round(v, 3) for name, v in med.items()},
        "ttft_speedup_vs_full": round(med["full"] / med["cacheblend"], 3),
        "ttft_speedup_vs_prefix_cache": round(med["prefix"] / med["cacheblend"], 3),
        "first_sight_ttft_s": {name: round(v, 3) for name, v in first_sight.items()},
        "top1_agree_vs_full": round(mean("cacheblend", "top1_agree"), 4),
        "kl_vs_full_nats": round(mean("cacheblend", "kl_nats"), 5),
        "prefix_cache_top1_agree_vs_full": round(mean("prefix", "top1_agree"), 4),
        "prefix_cache_kl_vs_full_nats": round(mean("prefix", "kl_nats"), 5),
        "agree_positions": positions,
        "blend": stats, "threads_bind": threads, "dtype": args.dtype, **machine(),
    }
    for llm in engines.values():  # explicitly: left to interpreter exit, teardown races abort the process
        llm.llm_engine.engine_core.shutdown()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
    # Interpreter teardown with three engines' client threads alive aborts now and then ("terminate
    # called without an active exception", exit 134) after everything is printed: end here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
