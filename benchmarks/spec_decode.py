"""Speculative decoding: no speculation, speculative sampling (one chain), SpecTr (k chains) and
Scylla's adaptive policy, with the same draft source, the same prompts and seeds, in one run.

``--engine vllm`` (default): stock vLLM without speculation; vLLM's own n-gram speculation (its
deterministic prompt lookup and verification: the yardstick a user has today); and fastctx's
SpecTr proposer, whose n-gram draft distribution serves speculative sampling (1 chain), SpecTr
(2 and 4 chains) and fixed lengths (0 included) as per-request arms of one engine, and in the same
engine Scylla's policy for the requests that name no arm (so Scylla and the fixed arms differ in
nothing else). That first pass selects: per batch size the best fixed speculative arm, and vLLM's own
per-batch-size schedule (``num_speculative_tokens_per_batch_size``) over the same draft, tuned
offline the way vLLM's docs describe (per batch size the fastest single-chain depth, 0 included),
served by an engine of its own. A second pass then compares: Scylla, the selected best fixed arm
and vLLM's schedule take turns again, at each batch size until each has run ``--compare-seconds``
(a run of ~15 s at batch 8 differs from the next by ~10% here), and Scylla's ratios come from it,
with its ratio to the table turn by turn. Judged on the pass that
picked it, the best of five arms wins partly by luck (on this host the same arm's speed differs
by up to ~25% between passes); the first pass's ratios are kept as ``..._selection_pass``.
Prompts are copy tasks (a passage, then "the same text again" and its first 64 tokens), each
request a different passage; every batch size runs the same ``--prompts`` (default: the largest
batch size), in batches of its size, so accepted lengths at different batch sizes differ by
sampling only. The prompts are prefilled once before timing (prefix cache), so the timed runs are
decode. ``accept_len`` is tokens per verification: accepted drafts plus the
residual or bonus token (fastctx's counts; for vLLM's n-gram its engine's own counters, over the steps
where its prompt lookup drafted). One chain is verified in
vLLM's own pass (``tokens_per_engine_step`` = ``accept_len``); k >= 2 chains are verified in a pass
of fastctx's and vLLM then adds one token more (``accept_len + 1`` for two target passes).

``--engine hf``: fastctx's engine-free loop (``fastctx.specdec.hf_loop``: transformers model, one
request at a time) with a model draft (``stream``, ``layers:N``, ``model:DIR``) or ``ngram``, on
natural-text prompts.

Methods take turns per batch of prompts (vllm) or prompt (hf) so drifting load hits all alike. The last
line printed is one JSON object.

    python benchmarks/spec_decode.py --quick                      # vLLM, batch 1 and 4, 64 tokens
    python benchmarks/spec_decode.py --batches 1,2,4,8 --new-tokens 128
    python benchmarks/spec_decode.py --engine hf --quick           # stream draft, 3 prompts x 48 tokens
    python benchmarks/spec_decode.py --engine hf --draft ngram --prompts 4 --new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import os
import time

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


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--quick", action="store_true",
                    help="vllm: batches 1,4, 64 new tokens; hf: 3 prompts of 1024 tokens, 48 new tokens")
    ap.add_argument("--batches", default="1,4",
                    help="vllm: batch sizes; each runs the same prompts in batches of its size")
    ap.add_argument("--model", default=None, help="target (default: fastctx's default model)")
    ap.add_argument("--draft", default="stream", help="stream | ngram | layers:N | model:DIR")
    ap.add_argument("--sink", type=int, default=4, help="stream draft: first tokens kept")
    ap.add_argument("--window", type=int, default=64, help="stream draft: last tokens kept")
    ap.add_argument("--prompts", type=int, default=None,
                    help="hf: prompts (default 4); vllm: prompts every batch size runs (default: the largest batch)")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=1,
                    help="vllm: times every method runs at every batch size at least (the selection pass's rounds "
                         "interleave over batch sizes; tok/s over all)")
    ap.add_argument("--compare-seconds", type=float, default=60.0,
                    help="vllm: the comparison pass takes more turns at a batch size until each of its methods "
                         "ran this long (at least --rounds turns): a method's speed drifts ~10%% between runs of "
                         "~15 s on this host")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--depth", type=int, default=4, help="speculation length of the fixed SD / SpecTr runs")
    ap.add_argument("--fixed-depths", default="1,2,3,4,6", help="single-chain lengths for the best fixed")
    ap.add_argument("--scylla-chains", default="1,2,4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.quick and args.engine == "hf":
        args.prompts, args.context, args.new_tokens = 3, 1024, 48
    elif args.quick:
        args.batches, args.context, args.new_tokens = "1,4", 512, 64
    if args.engine == "hf" and args.prompts is None:
        args.prompts = 4
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1")
    if args.prompts is not None and args.prompts < 1:
        ap.error(f"--prompts {args.prompts}: give at least 1")
    return args


def run_hf(args) -> dict:
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
    return {
        "engine": "hf", "draft": args.draft, "temperature": args.temperature, "batch_size": 1, "depth": args.depth,
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


SPECTR = "fastctx.vllm_plugin.spectr.SpecTrProposer"
SPECTR_ENGINES = ("fastctx", "vllm_table")  # the engines running fastctx's proposer


def copy_prompts(tok, count: int, context: int) -> list[list[int]]:
    """A passage, then an instruction to repeat it and the repeat's first 64 tokens: n-gram drafts' case."""
    text = token_ids(tok, natural_text())
    again = token_ids(tok, "\n\nThe same text again:\n\n")
    if len(text) < count * context:
        raise SystemExit(f"{count} prompts of {context} tokens need {count * context} tokens of text")
    return [p + again + p[:64] for p in (text[i * context:(i + 1) * context] for i in range(count))]


def spec_metrics(llm) -> tuple[int, int]:
    """This engine's cumulative (drafts, accepted draft tokens), read from its own Prometheus logger.

    Not through ``LLM.get_metrics()``: that reads Prometheus's global registry, where every new
    engine's logger unregisters the older engines' collectors, so in a process holding several
    engines it reads the newest engine's counters (zero for the n-gram engine here)."""
    for logger in llm.llm_engine.logger_manager.stat_loggers:
        prom = getattr(logger, "spec_decoding_prom", None)
        if prom is not None and prom.spec_decoding_enabled:
            return (int(prom.counter_spec_decode_num_drafts[0]._value.get()),
                    int(prom.counter_spec_decode_num_accepted_tokens[0]._value.get()))
    raise RuntimeError("this engine has no spec-decoding Prometheus logger (disable_log_stats=False?)")


def run_vllm(args) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from fastctx.default_model import require_default_model

    from engines import set_engine_env  # noqa: E402

    bind = set_engine_env(None)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    model_dir = args.model or str(require_default_model())
    tok = AutoTokenizer.from_pretrained(model_dir)
    batches = [int(x) for x in args.batches.split(",")]
    depths = sorted({int(x) for x in args.fixed_depths.split(",")} | {args.depth})
    prompts = copy_prompts(tok, args.prompts or max(batches), args.context)
    base = dict(model=model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=args.context + 512, seed=0,
                disable_log_stats=False,
                worker_extension_cls="fastctx.vllm_plugin.worker.FastctxWorkerExtension")
    spectr = {"method": "custom_class", "model": SPECTR, "num_speculative_tokens": max(depths) + 1}
    engines = {
        "stock": LLM(**base),
        "vllm_ngram": LLM(**base, speculative_config={"method": "ngram", "num_speculative_tokens": args.depth,
                                                      "prompt_lookup_min": 2, "prompt_lookup_max": 4}),
        # Scylla picks for the requests that name no arm; the fixed arms name theirs
        "fastctx": LLM(**base, speculative_config=spectr,
                       additional_config={"fastctx_spectr": {"chains": 4, "scylla": True}}),
    }
    # (engine, per-request arm): one fastctx engine serves every fixed arm and Scylla, so they share
    # everything else.
    runs = {"nospec": ("stock", None), "vllm_ngram": ("vllm_ngram", None)}
    runs.update({f"fixed_d{d}": ("fastctx", {"depth": d, "chains": 1}) for d in [0, *depths]})
    runs.update({f"spectr_k{k}": ("fastctx", {"depth": args.depth, "chains": k}) for k in (2, 4)})
    runs["scylla"] = ("fastctx", None)
    sd = f"fixed_d{args.depth}"

    def sampling(arm, n):
        extra = {"spectr": arm} if arm else None
        return SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True, extra_args=extra)

    def warm(llm):  # prefill every prompt once (prefix cache) and warm up
        llm.generate([{"prompt_token_ids": p} for p in prompts], sampling(None, 2), use_tqdm=False)

    for llm in engines.values():
        warm(llm)
    results: dict[str, dict] = {name: {} for name in runs}

    def timed(b, name, engine, arm, batch, into):
        """Time ``name`` on one ``batch`` of prompts (batch size ``b``), adding it to ``into`` (summed
        over the batches and rounds)."""
        llm = engines[engine]
        if engine in SPECTR_ENGINES:
            llm.collective_rpc("fastctx_spectr_stats", args=("reset",))
        before = spec_metrics(llm) if engine == "vllm_ngram" else None
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sampling(arm, args.new_tokens),
                            use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        run = {"tokens": tokens, "seconds": seconds, "verifications": 0, "verified_tokens": 0, "engine_steps": 0}
        if engine in SPECTR_ENGINES:
            st = llm.collective_rpc("fastctx_spectr_stats", args=("reset",))[0]
            run.update(verifications=st["steps"], verified_tokens=st["tokens"],
                       engine_steps=st["steps"] and st["tokens_per_step"] * st["steps"])
        elif engine == "vllm_ngram":
            drafts, accepted = (a - c for a, c in zip(spec_metrics(llm), before))
            run.update(verifications=drafts, verified_tokens=drafts + accepted)
        zero = {"tokens": 0, "seconds": 0.0, "verifications": 0, "verified_tokens": 0, "engine_steps": 0}
        total = into.setdefault(name, {}).setdefault(b, {**zero, **({"arms": {}} if name == "scylla" else {})})
        for key, value in run.items():
            total[key] += value
        if name == "scylla":
            for arm_name, count in st["arms"].items():
                total["arms"][arm_name] = total["arms"].get(arm_name, 0) + count
        total["tokens_per_s"] = total["tokens"] / total["seconds"]
        total["accept_len"] = total["verified_tokens"] / total["verifications"] if total["verifications"] else 1.0
        if engine in SPECTR_ENGINES and total["verifications"]:
            total["tokens_per_engine_step"] = total["engine_steps"] / total["verifications"]

    def measure(b, names, into, turn=0):
        """Every method of ``names`` at batch size ``b``, taking turns batch by batch of prompts (the order
        rotating): this host's speed drifts by up to ~25% over minutes, which would otherwise fall on
        whichever method ran then."""
        for i in range(0, len(prompts), b):
            shift = (turn + i // b) % len(names)
            for name in names[shift:] + names[:shift]:
                timed(b, name, *runs[name], prompts[i:i + b], into)
        for name in names:
            r = into[name][b]
            print(f"batch {b}: {name:11s} accept_len {r['accept_len']:5.2f} tok/s {r['tokens_per_s']:7.2f}", flush=True)

    for turn in range(args.rounds):  # rounds interleave too
        for b in batches:
            measure(b, list(runs), results, turn)

    def tps(name, b, of=results):
        return of[name][b]["tokens_per_s"]

    # vLLM's num_speculative_tokens_per_batch_size, tuned offline as vLLM's docs describe: per batch size
    # the fastest single-chain depth (0 included) measured above, served by an engine of its own.
    table = {b: int(max((n for n in runs if n.startswith("fixed_")), key=lambda n: tps(n, b))[len("fixed_d"):])
             for b in batches}
    ends = [*batches[1:], max(batches) + 1]
    schedule = [[lo if i else 1, hi - 1, table[lo]] for i, (lo, hi) in enumerate(zip(batches, ends))]
    print(f"vLLM per-batch-size schedule from the fixed depths: {schedule}", flush=True)
    table_config = {**spectr, "num_speculative_tokens_per_batch_size": schedule}
    engines["vllm_table"] = LLM(**base, speculative_config=table_config,
                                additional_config={"fastctx_spectr": {"chains": 1}})
    warm(engines["vllm_table"])
    runs["vllm_table"] = ("vllm_table", None)
    fixed = [n for n in runs if n.startswith(("fixed_", "spectr_")) and n != "fixed_d0"]
    best = {b: max(fixed, key=lambda n: tps(n, b)) for b in batches}
    print(f"best fixed speculative arm per batch size (selection pass): {best}", flush=True)
    compared: dict[str, dict] = {}  # the second pass
    turns: dict[int, list[dict[str, float]]] = {}  # per batch size, each turn's tok/s per method
    for b in batches:
        names, turn = ["scylla", best[b], "vllm_table"], 0
        while turn < args.rounds or min(compared[n][b]["seconds"] for n in names) < args.compare_seconds:
            before = {n: (compared[n][b]["tokens"], compared[n][b]["seconds"]) if b in compared.get(n, {})
                      else (0, 0.0) for n in names}
            measure(b, names, compared, turn)
            turns.setdefault(b, []).append({n: (compared[n][b]["tokens"] - before[n][0])
                                            / (compared[n][b]["seconds"] - before[n][1]) for n in names})
            turn += 1
    law = engines["fastctx"].collective_rpc("fastctx_spectr_stats")[0].get("scylla_law")
    for llm in engines.values():  # engine cores are processes: stop them before os._exit leaves them behind
        llm.llm_engine.engine_core.shutdown()

    def ratio(other, b, of=compared):
        return tps("scylla", b, of) / tps(other, b, of)

    b1 = batches[0]
    k4_vs_sd = {b: results["spectr_k4"][b]["accept_len"] / results[sd][b]["accept_len"] for b in batches}
    head = " ".join(f"{'b' + str(b) + ' acc':>8s} {'tok/s':>7s} {'x nospec':>8s}" for b in batches)
    print(f"\nselection pass\n{'method':12s} {head}")
    for name in results:
        print(f"{name:12s} " + " ".join(f"{results[name][b]['accept_len']:8.2f} {tps(name, b):7.2f} "
                                        f"{tps(name, b) / tps('nospec', b):8.3f}" for b in batches))
    def turn_ratios(other, b):
        return [t["scylla"] / t[other] for t in turns[b]]

    print("\ncomparison pass (tok/s, x Scylla; Scylla's ratio to the table turn by turn)")
    for b in batches:
        print(f"b{b}: " + "  ".join(f"{n} {tps(n, b, compared):.2f} ({1 / ratio(n, b):.3f})"
                                    for n in ("scylla", best[b], "vllm_table"))
              + "  turns " + " ".join(f"{r:.3f}" for r in turn_ratios("vllm_table", b)))

    return {
        "engine": "vllm", "draft": "ngram (fastctx: distribution over earlier matches; vllm_ngram: vLLM's)",
        "temperature": args.temperature, "depth": args.depth, "batches": batches, "context": args.context,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "compare_seconds": args.compare_seconds,
        "dtype": args.dtype, "threads_bind": bind, "machine": machine(),
        "accept_len_sd": results[sd][b1]["accept_len"],
        "accept_len_spectr_k2": results["spectr_k2"][b1]["accept_len"],
        "accept_len_spectr_k4": results["spectr_k4"][b1]["accept_len"],
        "accept_len_ratio_spectr_k4_vs_sd": results["spectr_k4"][b1]["accept_len"] / results[sd][b1]["accept_len"],
        "accept_len_vllm_ngram": results["vllm_ngram"][b1]["accept_len"],
        "tokens_per_s_nospec": tps("nospec", b1),
        "tokens_per_s_ratio_sd_vs_nospec": tps(sd, b1) / tps("nospec", b1),
        "tokens_per_s_ratio_spectr_k4_vs_nospec": tps("spectr_k4", b1) / tps("nospec", b1),
        "tokens_per_s_ratio_vllm_ngram_vs_nospec": tps("vllm_ngram", b1) / tps("nospec", b1),
        "best_fixed": best[b1],
        # Scylla's ratios: the comparison pass (the best arm and the table chosen on the selection pass)
        "tokens_per_s_ratio_scylla_vs_best_fixed": ratio(best[b1], b1),
        "accept_len_ratio_spectr_k4_vs_sd_min": min(k4_vs_sd.values()),
        "tokens_per_s_ratio_scylla_vs_best_fixed_min": min(ratio(best[b], b) for b in batches),
        "tokens_per_s_ratio_scylla_vs_best_fixed_selection_pass_min": min(ratio(best[b], b, results) for b in batches),
        "per_batch": {b: {"best_fixed": best[b], "scylla_vs_best_fixed": ratio(best[b], b),
                          "scylla_vs_vllm_table": ratio("vllm_table", b),
                          "comparison_turns": len(turns[b]),
                          "scylla_vs_vllm_table_per_turn": turn_ratios("vllm_table", b),
                          "scylla_vs_best_fixed_per_turn": turn_ratios(best[b], b),
                          "scylla_vs_best_fixed_selection_pass": ratio(best[b], b, results),
                          "accept_len_ratio_spectr_k4_vs_sd": k4_vs_sd[b],
                          "scylla_vs_nospec_selection_pass": ratio("nospec", b, results),
                          "comparison_pass": {n: compared[n][b] for n in compared if b in compared[n]},
                          **{n: results[n][b] for n in results}} for b in batches},
        "scylla_law": law,
        "vllm_table": schedule,
        "tokens_per_s_ratio_scylla_vs_vllm_table": ratio("vllm_table", b1),
        "tokens_per_s_ratio_scylla_vs_vllm_table_min": min(ratio("vllm_table", b) for b in batches),
    }


def main() -> None:
    args = parse_args()
    result = run_hf(args) if args.engine == "hf" else run_vllm(args)
    print(json.dumps(result, default=float))
    if args.engine == "vllm":
        os._exit(0)  # vLLM's teardown at exit can abort after the result is out


if __name__ == "__main__":
    main()
