"""SambaY vs a transformer of about its size, both served by vLLM in one run: decode tokens/s and KV bytes.

The transformer is the embedded SmolLM2-135M (Llama layout, 135M parameters);
the SambaY checkpoint is a random-weight one written by ``fastctx sambay init``'s
defaults (140M parameters, same width and vocabulary). Both engines get the same
prompts, threads and dtype, prefix caching off (SambaY refuses it), greedy
decoding with EOS ignored. Engines take turns round after round; decode
tokens/s is counted over the window in which every request has its first token
and none has finished (``decode_tps.decode_run``). KV bytes per token come from
each engine's own cache specs at the run's sequence length (prompt + new tokens).
The last line printed is one JSON object.

    python benchmarks/sambay_decode.py --quick            # 2K prompt, 256 new tokens, batch 4, 2 rounds
    python benchmarks/sambay_decode.py --context 4096 --new-tokens 512 --batch 8
    python benchmarks/sambay_decode.py --quick --ttft      # also one prompt's time to first token
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from decode_tps import decode_run, prompts  # noqa: E402  (benchmarks/ is on sys.path)

from engines import fast_dtype, machine, set_engine_env  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2K prompt, 256 new tokens, batch 4, 2 rounds")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", help="engine dtype (default: the one stock vLLM is fastest at on this CPU)")
    parser.add_argument("--sambay", help="SambaY checkpoint (default: a fresh `fastctx sambay init` one)")
    parser.add_argument("--threads-bind", help="VLLM_CPU_OMP_THREADS_BIND for both engines (default: all cores)")
    parser.add_argument("--ttft", action="store_true",
                        help="also time one prompt's prefill (first token), with a third engine: SambaY with "
                             "--kv-sharing-fast-prefill (prompt tokens skip the cross-decoder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.new_tokens, args.batch, args.reps = 2048, 256, 4, 2
    threads = set_engine_env(args.threads_bind)
    args.dtype = args.dtype or fast_dtype()
    print(f"dtype={args.dtype} {machine()}", flush=True)

    from transformers import AutoTokenizer
    from vllm import LLM

    from fastctx.default_model import require_default_model
    from fastctx.models.sambay.checkpoint import write_checkpoint
    from fastctx.vllm_plugin.kv_footprint import engine_kv_footprint

    transformer = str(require_default_model())
    with tempfile.TemporaryDirectory(prefix="sambay-") as tmp:
        sambay = args.sambay
        if sambay is None:
            sambay = str(Path(tmp) / "sambay")
            write_checkpoint(Path(sambay), Path(transformer))
        tokenizer = AutoTokenizer.from_pretrained(transformer)
        batch = prompts(tokenizer, args.batch, args.context)
        seq_len = args.context + args.new_tokens
        common = dict(dtype=args.dtype, enforce_eager=True, max_model_len=seq_len + 16, enable_prefix_caching=False,
                      seed=0, max_num_seqs=max(args.batch, 8),
                      worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension")
        engines = {"transformer": LLM(model=transformer, **common), "sambay": LLM(model=sambay, **common)}
        if args.ttft:
            fast = LLM(model=sambay, kv_sharing_fast_prefill=True, **common)
        for llm in engines.values():  # warm-up: first-call allocations, thread pools
            decode_run(llm, [ids[:256] for ids in batch[:1]], 8)
        tps = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, llm in engines.items():
                tps[name].append(decode_run(llm, batch, args.new_tokens)[0])
        kv = {name: engine_kv_footprint(llm, seq_len) for name, llm in engines.items()}
        ttfts = {}
        if args.ttft:
            timed = {**engines, "sambay_fast_prefill": fast}
            ttft(fast, batch[0][:256], 1)  # warm-up
            samples = {name: [] for name in timed}
            for _ in range(args.reps):  # engines take turns
                for name, llm in timed.items():
                    samples[name].append(ttft(llm, batch[0], 1))
            ttfts = {name: min(times) for name, times in samples.items()}
        params = {"transformer": checkpoint_parameters(transformer), "sambay": checkpoint_parameters(sambay)}
    result = {"context_tokens": args.context, "new_tokens": args.new_tokens, "batch": args.batch, "reps": args.reps,
              "dtype": args.dtype, "threads_bind": threads, **machine(),
              "parameters": params, "kv_footprint": kv}
    for name in engines:
        result[f"decode_tps_{name}"] = round(statistics.median(tps[name]), 2)
        print(f"{name:>12}: decode tok/s per round {[round(t, 2) for t in tps[name]]}", flush=True)
    for name, seconds in ttfts.items():
        result[f"ttft_s_{name}"] = round(seconds, 3)
        if name != "transformer":
            result[f"ttft_speedup_{name}_vs_transformer"] = round(ttfts["transformer"] / seconds, 3)
    result["decode_tps_ratio_vs_transformer"] = round(result["decode_tps_sambay"] / result["decode_tps_transformer"], 3)
    kv_ratio = kv["sambay"]["bytes_per_token"] / kv["transformer"]["bytes_per_token"]
    result["kv_bytes_per_token_ratio"] = round(kv_ratio, 4)
    print(json.dumps(result))
    return result


def ttft(llm, ids: list[int], reps: int) -> float:
    """Best time to the first token of one prompt (prefix caching is off: every run prefills)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best


def checkpoint_parameters(path: str) -> int:
    """Parameters stored in a checkpoint's safetensors files (a tied head is stored once)."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


if __name__ == "__main__":
    main()
