"""Time to first token: stock vLLM CPU attention vs fastctx methods, in one run.

Both engines are loaded side by side with the same model, flags, thread
binding and prompt; requests alternate between them so that drifting machine
load hits both alike. TTFT is the wall time of a 1-token greedy generation
with prefix caching off. The last line printed is one JSON object.

Per sparse method it also reports the attention density its backend achieved
on the timed prompt, and the teacher-forced top-1 agreement with stock vLLM
over the prompt's last positions (from vLLM's prompt logprobs).

    python benchmarks/prefill_ttft.py --quick          # 4K-token prompt, 2 rounds
    python benchmarks/prefill_ttft.py --tokens 4096 8192 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fastctx.eval.server import METHODS
from fastctx.eval.texts import prompt_token_ids

from engines import build_engines, fast_dtype, machine, set_engine_env  # noqa: E402  (benchmarks/ is on sys.path)


def prompt_top1(llm, ids: list[int], last: int) -> list[int]:
    """Teacher-forced argmax next token at each of the prompt's last positions (prompt logprobs)."""
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    return [next(t for t, lp in pos.items() if lp.rank == 1) for pos in out.prompt_logprobs[-last:]]


def ttft(llm, ids: list[int]) -> float:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - start


def engine_density(llm, reset: bool = False) -> float:
    """Density the engine's backend achieved since the last reset (read in its worker)."""
    stats = llm.collective_rpc("fastctx_density", args=(reset,))[0]
    return round(stats[0]["density"], 4) if stats else 1.0


def show_generation(engines, tokenizer) -> bool:
    from vllm import SamplingParams

    chat = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    texts = {}
    for name, llm in engines.items():
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
        texts[name] = out[0].outputs[0].text
        print(f"[{name}] {texts[name]!r}")
    return len(set(texts.values())) == 1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 4096-token prompt, 2 rounds")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for both engines "
                        "(default: the environment's, else all cores)")
    parser.add_argument("--generate", action="store_true",
                        help="also print a short greedy chat answer from each engine")
    parser.add_argument("--methods", nargs="+", default=["dense", "minference", "flexprefill"],
                        choices=list(METHODS))
    parser.add_argument("--method", action="append", default=[], metavar="NAME=JSON",
                        help="override a method's fastctx section, e.g. minference='{...}'")
    parser.add_argument("--dtype", help="engine dtype (default: the one stock vLLM is fastest at on this CPU)")
    parser.add_argument("--agree-last", type=int, default=512,
                        help="positions at the prompt's end for top-1 agreement with stock")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.reps = [4096], 2
    methods = {name: METHODS[name] for name in dict.fromkeys(["stock", *args.methods])}
    for override in args.method:
        name, _, section = override.partition("=")
        methods[name] = json.loads(section)
    threads = set_engine_env(args.threads_bind)
    args.dtype = args.dtype or fast_dtype()
    print(f"dtype={args.dtype} {machine()}", flush=True)

    from transformers import AutoConfig, AutoTokenizer

    from fastctx.default_model import require_default_model

    model = args.model or str(require_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    # A prompt plus its one generated token must fit the model's context.
    context = AutoConfig.from_pretrained(model).max_position_embeddings
    args.tokens = [min(n, context - 1) for n in args.tokens]
    engines = build_engines(model, max(args.tokens) + 1, methods, args.dtype)
    batched = engines["stock"].llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

    same_text = show_generation(engines, tokenizer) if args.generate else None
    for llm in engines.values():  # warm-up: first-call allocations, thread pools
        ttft(llm, prompt_token_ids(tokenizer, 256))

    rows = []
    sparse = [m for m in engines if m != "stock"]
    print(f"threads_bind={threads} max_num_batched_tokens={batched} reps={args.reps}")
    for n in args.tokens:
        ids = prompt_token_ids(tokenizer, n)
        times = {m: [] for m in engines}
        for m in sparse:
            engine_density(engines[m], reset=True)
        for _ in range(args.reps):
            for name, llm in engines.items():
                times[name].append(ttft(llm, ids))
        med = {m: statistics.median(t) for m, t in times.items()}
        reference = prompt_top1(engines["stock"], ids, args.agree_last)
        row = {"prompt_tokens": n, **{f"ttft_{m}_s": round(med[m], 3) for m in engines}}
        for m in sparse:
            row[f"density_{m}"] = engine_density(engines[m])
            row[f"ttft_speedup_{m}"] = round(med["stock"] / med[m], 3)
            got = prompt_top1(engines[m], ids, args.agree_last)
            row[f"top1_agree_{m}"] = round(sum(a == b for a, b in zip(got, reference)) / len(reference), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**rows[-1], "threads_bind": threads, "max_num_batched_tokens": batched,
              "reps": args.reps, "dtype": args.dtype, **machine(), "by_length": rows}
    if same_text is not None:
        result["same_generation"] = same_text
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
