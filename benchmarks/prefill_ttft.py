"""Time to first token: stock vLLM CPU attention vs fastctx methods, in one run.

Both engines are loaded side by side with the same model, flags, thread
binding and prompt; requests alternate between them so that drifting machine
load hits both alike. TTFT is the wall time of a 1-token greedy generation
with prefix caching off. The last line printed is one JSON object.

    python benchmarks/prefill_ttft.py --quick          # 2K-token prompt, 2 rounds
    python benchmarks/prefill_ttft.py --tokens 2048 4096 8192 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from fastctx.eval.texts import prompt_token_ids

METHODS = {
    "stock": {},
    "dense": dict(attention_config={"backend": "CUSTOM"},
                  additional_config={"fastctx": {"attention": "dense"}}),
}


def set_engine_env(threads_bind: str | None) -> str:
    """Pin both engines to the same cores; returns the binding used."""
    if threads_bind is None:
        threads_bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{os.cpu_count() - 1}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return threads_bind


def build_engines(model: str, max_len: int):
    from vllm import LLM

    common = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=max_len,
                  enable_prefix_caching=False, seed=0)
    return {name: LLM(**common, **extra) for name, extra in METHODS.items()}


def ttft(llm, ids: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams

    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1),
                       use_tqdm=False)
    return time.perf_counter() - start, out[0].outputs[0].token_ids[0]


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
    parser.add_argument("--quick", action="store_true", help="one 2048-token prompt, 2 rounds")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for both engines "
                        "(default: the environment's, else all cores)")
    parser.add_argument("--generate", action="store_true",
                        help="also print a short greedy chat answer from each engine")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.reps = [2048], 2
    threads = set_engine_env(args.threads_bind)

    from transformers import AutoConfig, AutoTokenizer

    from fastctx.models import require_default_model

    model = args.model or str(require_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    # A prompt plus its one generated token must fit the model's context.
    context = AutoConfig.from_pretrained(model).max_position_embeddings
    args.tokens = [min(n, context - 1) for n in args.tokens]
    engines = build_engines(model, max(args.tokens) + 1)
    batched = engines["stock"].llm_engine.vllm_config.scheduler_config.max_num_batched_tokens

    same_text = show_generation(engines, tokenizer) if args.generate else None
    for llm in engines.values():  # warm-up: first-call allocations, thread pools
        ttft(llm, prompt_token_ids(tokenizer, 256))

    rows = []
    print(f"threads_bind={threads} max_num_batched_tokens={batched} reps={args.reps}")
    print(f"{'tokens':>7} " + " ".join(f"{m + '_s':>9}" for m in METHODS) + "   speedup_dense  same_token")
    for n in args.tokens:
        ids = prompt_token_ids(tokenizer, n)
        times = {m: [] for m in METHODS}
        first = {}
        for _ in range(args.reps):
            for name, llm in engines.items():
                seconds, first[name] = ttft(llm, ids)
                times[name].append(seconds)
        med = {m: statistics.median(t) for m, t in times.items()}
        row = {"prompt_tokens": n, **{f"ttft_{m}_s": round(med[m], 3) for m in METHODS},
               "ttft_speedup_dense": round(med["stock"] / med["dense"], 3),
               "same_first_token": len(set(first.values())) == 1}
        rows.append(row)
        print(f"{n:>7} " + " ".join(f"{med[m]:>9.2f}" for m in METHODS)
              + f"   {row['ttft_speedup_dense']:>13.2f}  {row['same_first_token']}")

    result = {**rows[-1], "threads_bind": threads, "max_num_batched_tokens": batched,
              "reps": args.reps, "by_length": rows}
    if same_text is not None:
        result["same_generation"] = same_text
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
