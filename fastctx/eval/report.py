"""Builds ``results.json``, ``report.md`` and PNG plots from what a run stored.

Works on a partial run too (interrupted, or still going): it reads only the JSONL files.
TTFT is split in two: over all requests (later turns hit the prefix cache) and over
first turns only (a cold prefill of the whole context, where sparse prefill acts).
Speedups are dense's first-turn TTFT p50 over the method's.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastctx.eval.agreement import compare
from fastctx.eval.client import BLEND_COUNTS
from fastctx.eval.store import read_jsonl

REFERENCE = "dense"


def _pct(values, q):
    return float(np.percentile(values, q)) if values else None


def _mean(values):
    return float(np.mean(values)) if values else None


def request_stats(reqs: list[dict]) -> dict:
    first = [r["ttft_s"] for r in reqs if r["turn"] == 0]
    dens = [r["density"] for r in reqs if r.get("density") and "causal_pairs" in r["density"]]
    causal = sum(d["causal_pairs"] for d in dens)
    decode = [r["density"] for r in reqs if r.get("density") and "decode_causal_pairs" in r["density"]]
    decode_causal = sum(d["decode_causal_pairs"] for d in decode)
    kv = [r["kv_usage"] for r in reqs if r.get("kv_usage") is not None]
    blends = [r["blend"] for r in reqs if r.get("blend")]
    return {
        "n": len(reqs),
        "score": _mean([r["score"] for r in reqs]),
        "ttft_p50_s": _pct([r["ttft_s"] for r in reqs], 50),
        "ttft_p90_s": _pct([r["ttft_s"] for r in reqs], 90),
        "ttft_first_turn_p50_s": _pct(first, 50),
        "decode_tok_s": _pct([r["decode_tok_s"] for r in reqs if r.get("decode_tok_s")], 50),
        "prompt_tokens": _mean([r["prompt_tokens"] for r in reqs]),
        "cached_tokens": _mean([r["cached_tokens"] for r in reqs if r.get("cached_tokens") is not None]),
        "kv_usage_peak": max(kv) if kv else None,
        # Share of causal (query, key) pairs the fastctx prefill read; None: not a fastctx method.
        "density": sum(d["read_pairs"] for d in dens) / causal if causal else None,
        # The same for decodes, when a fastctx decode method ran.
        "decode_density": sum(d["decode_read_pairs"] for d in decode) / decode_causal if decode_causal else None,
        # CacheBlend's counts summed over the requests (None: no KV connector).
        "blend": {k: sum(b[k] for b in blends) for k in BLEND_COUNTS} if blends else None,
    }


def _item_id(key: str) -> str:
    return key.split("|", 1)[1]


def fidelity(logprob_records: list[dict], method: str) -> dict:
    """Per kind (``answer`` spans, natural ``text``): agreement with dense, pooled over positions."""
    by_item = {(r["method"], _item_id(r["key"])): r for r in logprob_records}
    out = {}
    for kind in ("answer", "text"):
        ref_rows, test_rows = [], []
        for (m, item), rec in by_item.items():
            ref = by_item.get((REFERENCE, item))
            if m == method and rec["kind"] == kind and ref is not None:
                ref_rows += [{int(t): lp for t, lp in row.items()} for row in ref["logprobs"]]
                test_rows += [{int(t): lp for t, lp in row.items()} for row in rec["logprobs"]]
        out["answer_span" if kind == "answer" else "natural_text"] = compare(ref_rows, test_rows) if ref_rows else None
    return out


def aggregate(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text()) if (out_dir / "config.json").exists() else {}
    records = read_jsonl(out_dir / "results.jsonl")
    reqs = [r for r in records if r["kind"] == "request"]
    logprobs = read_jsonl(out_dir / "logprobs.jsonl")
    names = list(dict.fromkeys([*config.get("methods", {}), *(r["method"] for r in reqs)]))
    methods = {}
    for m in names:
        mine = [r for r in reqs if r["method"] == m]
        tasks = defaultdict(list)
        lengths = defaultdict(lambda: defaultdict(list))
        for r in mine:
            tasks[r["task"]].append(r)
            lengths[r["task"]][r["length"]].append(r)
        methods[m] = {
            "config": config.get("methods", {}).get(m),
            "overall": request_stats(mine),
            "tasks": {t: request_stats(rs) for t, rs in tasks.items()},
            "by_length": {t: {str(n): request_stats(rs) for n, rs in sorted(ls.items())} for t, ls in lengths.items()},
            "fidelity_vs_dense": fidelity(logprobs, m) if m != REFERENCE else None,
        }
    _add_speedups(methods)
    events = [r for r in records if r["kind"] == "event" and r["event"] != "server_started"]
    return {"config": config, "methods": methods, "events": events}


def _add_speedups(methods: dict) -> None:
    """First-turn TTFT speedups against fastctx ``dense`` and, when it ran, stock vLLM."""
    for base in (REFERENCE, "stock"):
        ref = methods.get(base)
        for stats in methods.values():
            pairs = [(stats["overall"], ref and ref["overall"])]
            pairs += [(mine, ref and ref["tasks"].get(task)) for task, mine in stats["tasks"].items()]
            pairs += [(mine, ref and ref["by_length"].get(task, {}).get(n))
                      for task, by_len in stats["by_length"].items() for n, mine in by_len.items()]
            for mine, theirs in pairs:
                a = theirs and theirs["ttft_first_turn_p50_s"]
                b = mine["ttft_first_turn_p50_s"]
                mine[f"speedup_vs_{base}"] = a / b if a and b else None


# What `stock` is on each engine.
ENGINE_NAMES = {"vllm": "vLLM (`stock`: its own CPU attention)", "sglang": "SGLang (`stock`: its torch_native backend)"}


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(results: dict) -> str:
    cfg, methods = results["config"], results["methods"]
    tasks = list(dict.fromkeys(t for m in methods.values() for t in m["tasks"]))
    lines = ["# fastctx-eval report", "",
             f"Engine **{ENGINE_NAMES.get(cfg.get('engine', 'vllm'), cfg.get('engine'))}**, "
             f"model `{cfg.get('model')}`, mode **{cfg.get('mode')}**, {cfg.get('queries')} queries per context, "
             f"{cfg.get('sessions')} context(s) per task and length, lengths {cfg.get('lengths')} tokens, "
             f"seed {cfg.get('seed')}.", ""]
    if cfg.get("partial", True):
        lines += ["**Partial run**: not every planned item is in yet (rerun the command to finish).", ""]
    lines += ["## Score (SCBench scorer, mean over queries)", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, s in methods.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(s["tasks"].get(t, {}).get("score")) for t in tasks) + " |")
    lines += ["", "## First-turn TTFT p50 in s (cold prefill of the context), speedup vs dense", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, s in methods.items():
        cells = []
        for t in tasks:
            st = s["tasks"].get(t, {})
            cells.append(f"{_fmt(st.get('ttft_first_turn_p50_s'))} ({_fmt(st.get('speedup_vs_dense'))}x)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Per method, all tasks", "",
              "| method | score | TTFT p50 / p90 s | first-turn TTFT p50 s | speedup vs dense / stock | "
              "decode tok/s | prompt tok | cached tok | KV peak | density | answer top-1 / KL | text top-1 / KL |",
              "|---" * 12 + "|"]
    for m, s in methods.items():
        o, fid = s["overall"], s["fidelity_vs_dense"] or {}
        def agree(part, m=m):
            return "ref" if m == REFERENCE else (
                f"{_fmt(part['top1_agree'])} / {_fmt(part['kl_nats'])}" if part else "-")
        lines.append(f"| {m} | {_fmt(o['score'])} | {_fmt(o['ttft_p50_s'])} / {_fmt(o['ttft_p90_s'])} | "
                     f"{_fmt(o['ttft_first_turn_p50_s'])} | {_fmt(o.get('speedup_vs_dense'))} / "
                     f"{_fmt(o.get('speedup_vs_stock'))} | "
                     f"{_fmt(o['decode_tok_s'])} | {_fmt(o['prompt_tokens'])} | {_fmt(o['cached_tokens'])} | "
                     f"{_fmt(o['kv_usage_peak'])} | {_fmt(o['density'])} | {agree(fid.get('answer_span'))} | "
                     f"{agree(fid.get('natural_text'))} |")
    lines += ["", "Density: share of causal (query, key) pairs fastctx's prefill read (`-`: the stock engine). "
              "KV peak: the server's KV-cache usage (0-1) sampled after each request's prefill. "
              "Top-1 / KL: teacher-forced next-token agreement with dense and mean KL(dense || method) in nats, "
              "on the golden answer spans and on the last positions of Python standard-library source text "
              "(KL over the top-20 tokens plus a bucket: a lower bound).", "",
              "## Score by context length", "", "| method | task | " +
              " | ".join(map(str, cfg.get("lengths", []))) + " |", "|---" * (len(cfg.get("lengths", [])) + 2) + "|"]
    for m, s in methods.items():
        for t, by_len in s["by_length"].items():
            lines.append(f"| {m} | {t} | " + " | ".join(
                _fmt(by_len.get(str(n), {}).get("score")) for n in cfg.get("lengths", [])) + " |")
    blended = {m: s["overall"]["blend"] for m, s in methods.items() if s["overall"].get("blend")}
    if blended:
        lines += ["", "## CacheBlend", "", "| method | chunks hit / missed | tokens reused / recomputed | "
                  "load s | blend s |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {b['chunks_hit']} / {b['chunks_missed']} | {b['tokens_reused']} / "
                  f"{b['tokens_recomputed']} | {_fmt(b['load_s'])} | {_fmt(b['blend_s'])} |"
                  for m, b in blended.items()]
        lines += ["", "Load: fetching stored chunks and prefilling new ones on their own; blend: the recompute "
                  "and writing vLLM's cache. No teacher-forced fidelity for a KV connector's method: vLLM reads no "
                  "cache for prompt-logprob requests (`benchmarks/cacheblend_ttft.py` measures it offline)."]
    if results["events"]:
        lines += ["", "## Server incidents", ""]
        lines += [f"- {e['method']} replica {e.get('replica', 0)}: {e['event']} "
                  f"({e.get('item', '')}) {e.get('error', '')[:200]}" for e in results["events"]]
    lines += ["", "Plots: `score.png`, `ttft_vs_length.png`, `speedup_vs_fidelity.png`."]
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    tasks = list(dict.fromkeys(t for m in methods.values() for t in m["tasks"]))
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    width = 0.8 / max(1, len(methods))
    for i, (m, s) in enumerate(methods.items()):
        xs = np.arange(len(tasks)) + i * width
        ax.bar(xs, [s["tasks"].get(t, {}).get("score") or 0 for t in tasks], width, label=m)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Score per task and method")
    fig.tight_layout()
    paths.append(out_dir / "score.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, s in methods.items():
        points = defaultdict(list)
        for by_len in s["by_length"].values():
            for n, st in by_len.items():
                if st["ttft_first_turn_p50_s"] is not None:
                    points[int(n)].append(st["ttft_first_turn_p50_s"])
        if points:
            xs = sorted(points)
            ax.plot(xs, [np.median(points[x]) for x in xs], marker="o", label=m)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("first-turn TTFT p50 (s)")
    ax.set_title("TTFT vs context length")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "ttft_vs_length.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    paths.append(_speedup_vs_fidelity(plt, methods, out_dir))
    return paths


def _speedup_vs_fidelity(plt, methods: dict, out_dir: Path) -> Path:
    """Per method and length: first-turn TTFT speedup (vs stock vLLM when it ran, else vs dense)
    against teacher-forced top-1 agreement with dense on natural text (measured at the longest length)."""
    base = "stock" if "stock" in methods else REFERENCE
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, s in methods.items():
        fid = (s.get("fidelity_vs_dense") or {}).get("natural_text")
        top1 = 1.0 if m in (REFERENCE, "stock") else fid and fid.get("top1_agree")
        if top1 is None:
            continue
        lengths = sorted({int(n) for by_len in s["by_length"].values() for n in by_len})
        for n in lengths:
            speedups = [by_len[str(n)].get(f"speedup_vs_{base}") for by_len in s["by_length"].values()
                        if str(n) in by_len]
            speedups = [x for x in speedups if x]
            if speedups:
                ax.scatter(top1, np.median(speedups), label=f"{m} @ {n}")
                ax.annotate(f"{m} {n}", (top1, np.median(speedups)), fontsize=7)
    ax.set_xlabel("text top-1 agreement with dense (longest length)")
    ax.set_ylabel(f"first-turn TTFT speedup vs {base}")
    ax.set_title("Speed against fidelity")
    fig.tight_layout()
    path = out_dir / "speedup_vs_fidelity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    results = aggregate(out_dir)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_dir / "results.json")
    plots(results, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(results))
    return report
