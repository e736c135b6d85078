"""Speculative decoding: no speculation, speculative sampling (one chain), SpecTr (k chains) and
Scylla's adaptive policy, with the same draft source, the same prompts and seeds, in one run.

The loop is fastctx's engine-free one (``fastctx.specdec.hf_loop``: transformers model, one
request at a time, batch size 1); no engine hosts SpecTr yet. Methods take turns per prompt so
drifting machine load hits all alike. ``accept_len`` is tokens per target forward (accepted
drafts plus the target's own token); tokens/s counts decode only (after the prompt's prefill).
The last line printed is one JSON object.

    python benchmarks/spec_decode.py --quick                      # stream draft, 3 prompts x 48 tokens
    python benchmarks/spec_decode.py --draft ngram --prompts 4 --new-tokens 96
    python benchmarks/spec_decode.py --draft layers:24 --temperature 1.0
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastctx.eval.texts import natural_text, token_ids
from fastctx.specdec.hf_loop import ModelDraft, NgramDraft, Stats, generate, layer_skip_draft
from fastctx.specdec.scylla import ScyllaPolicy

from engines import machine  # noqa: E402  (benchmarks/ is on sys.path)


def make_draft(spec: str, target, args):
    """``stream`` (the target over sink + window KV), ``ngram``, ``layers:N`` or ``model:DIR``."""
    if spec == "stream":
        return lambda: ModelDraft(target, args.sink, args.window)
    if spec == "ngram":
        return lambda: NgramDraft(target.config.vocab_size)
    kind, _, value = spec.partition(":")
    if kind == "layers":
        model = layer_skip_draft(target, int(value))
        return lambda: ModelDraft(model)
    if kind == "model":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(value, dtype=target.dtype).eval()
        if model.config.vocab_size != target.config.vocab_size:
            raise SystemExit(f"--draft {spec}: vocabulary {model.config.vocab_size} != target's "
                             f"{target.config.vocab_size}")
        return lambda: ModelDraft(model)
    raise SystemExit(f"--draft {spec!r}: use stream, ngram, layers:N or model:DIR")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 prompts of 1024 tokens, 48 new tokens")
    ap.add_argument("--model", default=None, help="target (default: fastctx's default model)")
    ap.add_argument("--draft", default="stream", help="stream | ngram | layers:N | model:DIR")
    ap.add_argument("--sink", type=int, default=4, help="stream draft: first tokens kept")
    ap.add_argument("--window", type=int, default=64, help="stream draft: last tokens kept")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--depth", type=int, default=4, help="speculation length of the fixed SD / SpecTr runs")
    ap.add_argument("--fixed-depths", default="1,2,3,4,6", help="single-chain lengths for the best fixed")
    ap.add_argument("--scylla-chains", default="1,2,4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.context, args.new_tokens = 3, 1024, 48

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastctx.default_model import require_default_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or str(require_default_model())
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    draft = make_draft(args.draft, target, args)
    text = token_ids(tok, natural_text())
    prompts = [text[i * args.context:(i + 1) * args.context] for i in range(args.prompts)]
    depths = [int(x) for x in args.fixed_depths.split(",")]
    chains = tuple(int(x) for x in args.scylla_chains.split(","))

    runs = {"nospec": dict(depth=0)}
    runs.update({f"fixed_d{d}": dict(depth=d, k=1) for d in sorted(set(depths + [args.depth]))})
    runs.update({f"spectr_k{k}": dict(depth=args.depth, k=k) for k in (2, 4)})
    runs["scylla"] = {}
    stats = {name: Stats() for name in runs}
    policy = ScyllaPolicy(depths=(0, *sorted(set(depths))), chains=chains, seed=0)
    for i, prompt in enumerate(prompts):
        for name, kw in runs.items():
            extra = {"policy": policy} if name == "scylla" else kw
            generate(target, draft() if name != "nospec" else None, prompt, args.new_tokens,
                     args.temperature, seed=1000 + i, stats=stats[name], **extra)
            print(f"prompt {i}: {name:10s} accept_len {stats[name].accept_len:.2f} "
                  f"tok/s {stats[name].tokens_per_s:.2f}", flush=True)

    tps = {name: s.tokens_per_s for name, s in stats.items()}
    sd = f"fixed_d{args.depth}"
    fixed = {name: v for name, v in tps.items() if name.startswith(("fixed_", "spectr_"))}
    best = max(fixed, key=fixed.get)
    print(f"\n{'method':12s} {'accept_len':>10s} {'tok/s':>8s} {'vs nospec':>9s}")
    for name, s in stats.items():
        print(f"{name:12s} {s.accept_len:10.2f} {s.tokens_per_s:8.2f} {s.tokens_per_s / tps['nospec']:9.3f}")
    print(f"scylla arms used (depth, chains): {dict(sorted(stats['scylla'].arms.items()))}")
    result = {
        "draft": args.draft, "temperature": args.temperature, "batch_size": 1, "depth": args.depth,
        "prompts": args.prompts, "context": args.context, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "threads": args.threads, "machine": machine(),
        "accept_len_sd": stats[sd].accept_len,
        "accept_len_spectr_k2": stats["spectr_k2"].accept_len,
        "accept_len_spectr_k4": stats["spectr_k4"].accept_len,
        "accept_len_ratio_spectr_k4_vs_sd": stats["spectr_k4"].accept_len / stats[sd].accept_len,
        "tokens_per_s_nospec": tps["nospec"],
        "tokens_per_s_ratio_sd_vs_nospec": tps[sd] / tps["nospec"],
        "tokens_per_s_ratio_spectr_k4_vs_nospec": tps["spectr_k4"] / tps["nospec"],
        "best_fixed": best,
        "tokens_per_s_ratio_scylla_vs_best_fixed": tps["scylla"] / tps[best],
        "tokens_per_s_ratio_scylla_vs_nospec": tps["scylla"] / tps["nospec"],
        "scylla_law": policy.law(),
        # vLLM's per-batch-size table needs SpecTr in the engine; this loop has batch size 1 only.
        "tokens_per_s_ratio_scylla_vs_vllm_table": None,
    }
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
