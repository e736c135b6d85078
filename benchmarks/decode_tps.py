"""Decode throughput: stock vLLM's decode kernel vs fastctx decode methods, in one run.

Every engine gets the same prompts (``--batch`` different texts of ``--context``
tokens each), the same threads and dtype, prefix caching off, greedy decoding of
``--new-tokens`` tokens (EOS ignored). Engines take turns, round after round, so
drifting machine load hits all alike. Decode tokens/s is counted over the window
in which every request of the batch has its first token and none has finished:
only decode steps run then. The last line printed is one JSON object.

    python benchmarks/decode_tps.py --quick                 # 4K context, 64 tokens, batch 4, 2 rounds
    python benchmarks/decode_tps.py --context 7000 --new-tokens 128 --batch 8 --methods dense streaming
    python benchmarks/decode_tps.py --context 7680 --new-tokens 64 --reps 2 --methods dense lserve
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fastctx import methods
from fastctx.eval.texts import natural_text, token_ids

from engines import build_engines, fast_dtype, machine, set_engine_env  # noqa: E402  (benchmarks/ is on sys.path)

# fastctx sections timed against stock; each computes its decodes in fastctx.
DECODE_METHODS = {
    "dense": {"attention": "dense", "decode": "dense"},
    "streaming": {"attention": "dense", "decode": "streaming", "streaming": {"sink": 128, "local": 1024}},
    # What fastctx-eval runs: LServe's defaults, a quarter of SmolLM2's KV heads streaming.
    "lserve": methods.get("lserve").eval_section,
}


def prompts(tokenizer, batch: int, context: int) -> list[list[int]]:
    ids = token_ids(tokenizer, natural_text())
    if len(ids) < batch * context:
        raise ValueError(f"{batch} prompts of {context} tokens need {batch * context} tokens of text, have {len(ids)}")
    return [ids[i * context:(i + 1) * context] for i in range(batch)]


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def decode_run(llm, batch: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of one batch over its decode-only window, and the generated tokens."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    tag = f"r{time.monotonic_ns()}"
    for i, ids in enumerate(batch):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    counts, tokens = {}, {}
    start = start_counts = end = end_counts = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        finished = False
        for out in outs:
            counts[out.request_id] = len(out.outputs[0].token_ids)
            tokens[out.request_id] = list(out.outputs[0].token_ids)
            finished |= out.finished
        if start is None and len(counts) == len(batch):  # every request has its first token
            start, start_counts = now, dict(counts)
        elif start is not None and end is None and finished:  # the window closes at the first finish
            end, end_counts = now, dict(counts)
    if end is None:
        raise RuntimeError("no decode-only window: use more --new-tokens")
    decoded = sum(end_counts[r] - start_counts[r] for r in start_counts)
    return decoded / (end - start), [tokens[f"{tag}-{i}"] for i in range(len(batch))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4K context, 64 new tokens, batch 4, 2 rounds")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["dense"], choices=list(DECODE_METHODS))
    parser.add_argument("--dtype", help="engine dtype (default: the one stock vLLM is fastest at on this CPU)")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for every engine (default: all cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.new_tokens, args.batch, args.reps = 4096, 64, 4, 2
    threads = set_engine_env(args.threads_bind)
    args.dtype = args.dtype or fast_dtype()
    print(f"dtype={args.dtype} {machine()}", flush=True)

    from transformers import AutoTokenizer

    from fastctx.default_model import require_default_model

    model = args.model or str(require_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    batch = prompts(tokenizer, args.batch, args.context)
    methods = {"stock": None, **{m: DECODE_METHODS[m] for m in args.methods}}
    engines = build_engines(model, args.context + args.new_tokens + 16, methods, args.dtype,
                            max_num_seqs=max(args.batch, 8))
    for llm in engines.values():  # warm-up: first-call allocations, thread pools
        decode_run(llm, [ids[:256] for ids in batch[:1]], 8)
    tps = {name: [] for name in engines}
    outputs = {}
    for _ in range(args.reps):
        for name, llm in engines.items():
            rate, outputs[name] = decode_run(llm, batch, args.new_tokens)
            tps[name].append(rate)
    result = {"context_tokens": args.context, "new_tokens": args.new_tokens, "batch": args.batch,
              "reps": args.reps, "dtype": args.dtype, "threads_bind": threads, **machine()}
    for name in engines:
        result[f"decode_tps_{name}"] = round(statistics.median(tps[name]), 2)
        print(f"{name:>10}: decode tok/s per round {[round(t, 2) for t in tps[name]]}", flush=True)
    for name in args.methods:
        result[f"decode_tps_ratio_{name}"] = round(result[f"decode_tps_{name}"] / result["decode_tps_stock"], 3)
        result[f"same_tokens_{name}"] = outputs[name] == outputs["stock"]
        # In bf16 any rounding difference can flip a near-tie, after which greedy texts part ways.
        result[f"agreeing_prefix_{name}"] = [agreeing_prefix(a, b) for a, b in zip(outputs[name], outputs["stock"])]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
